"""Parity of the fused masked feature loss (kernels/masked_feature_loss.py) with its
reference (kernels/reference.py): values and pred gradients, every dtype pair, both pred
layouts, awkward shapes. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set here when there is no GPU and the caller did not set it); `cuda` twins run compiled.

The shape/dtype/beta/layout/kind axes are covered pairwise (every value of every axis at
least once, every pred x target dtype pair) instead of their full product, to keep the file
fast. The truth is the reference computed in float64 (math_dtype=torch.float64).
"""
import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # must happen before `kernels` is first imported: triton.jit reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels import masked_feature_loss, masked_feature_loss_ref  # noqa: E402
from kernels.reference import gather_rows  # noqa: E402

mfl = importlib.import_module("kernels.masked_feature_loss")  # the module (the package exports the function)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not mfl.INTERPRET,
        reason="Triton on CPU needs TRITON_INTERPRET=1 set before `kernels` is first imported")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# grad atol (gradients scaled by B*M*C, so O(1)): one ulp of pred's dtype at 1.0
GRAD_ATOL = {f32: 1e-5, bf16: 2.0 ** -7, f16: 2.0 ** -10}


def _inputs(B, N, M, C, gather, device, seed=0):
    """fp32 pred, target, ids_masked: (B, N|M, C), (B, N, C), (B, M)."""
    g = torch.Generator().manual_seed(seed)
    # teacher features: non-negative, per-row offset and scale, like pooled ReLU maps
    target = F.relu(torch.randn(B, N, C, generator=g)) * (0.5 + 2 * torch.rand(B, N, 1, generator=g))
    target = target + torch.randn(B, N, 1, generator=g)
    pred = 1.5 * torch.randn(B, N if gather else M, C, generator=g)
    ids = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)])  # (B, M)
    return pred.to(device), target.to(device), ids.to(device)


def _run(fn, pred, target, ids, beta, kind="smooth_l1", grad_out=1.0, **kw):
    """loss and grad of pred (scaled by B*M*C so that values are O(1))."""
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(pred, target, ids, beta=beta, kind=kind, **kw)
    (loss * grad_out if grad_out != 1.0 else loss).backward()
    return loss.detach(), pred.grad * (ids.numel() * target.shape[-1])


def _truth(pred, target, ids, beta, kind="smooth_l1", grad_out=1.0):
    """The reference in float64 math: what low-precision errors are measured against."""
    loss, grad = _run(masked_feature_loss_ref, pred, target, ids, beta, kind, grad_out, math_dtype=torch.float64)
    return loss, grad.double()  # pred's grad has pred's dtype: fp64 math, one rounding at the end


def _channels_last_target(target, dtype):
    """(B, N, C) -> the same values as a channels_last (B, C, h, w) map viewed as (B, N, C)
    (the teacher's layout; h = N, w = 1): a view, no copy; stride(-1) == 1."""
    B, N, C = target.shape
    fmap = target.transpose(1, 2).reshape(B, C, N, 1).to(dtype).contiguous(memory_format=torch.channels_last)
    view = fmap.flatten(2).transpose(1, 2)  # (B, N, C)
    assert view.data_ptr() == fmap.data_ptr() and view.stride(-1) == 1
    return view


# (C, M, B, pred dtype, target dtype, beta, gather, kind): pairwise cover of the axes;
# "cl" targets are bf16 channels_last teacher maps viewed as (B, N, C)
CASES = [
    (1, 1, 1, f32, f32, 2.0, True, "smooth_l1"),
    (7, 13, 3, f32, bf16, 0.5, False, "mse"),
    (64, 147, 1, f32, f16, 1.0, True, "smooth_l1"),
    (100, 13, 3, bf16, f32, 1.0, True, "mse"),
    (768, 147, 3, bf16, bf16, 2.0, False, "smooth_l1"),
    (1024, 1, 3, bf16, f16, 0.5, True, "smooth_l1"),
    (2048, 13, 1, f16, f32, 0.5, False, "smooth_l1"),
    (7, 147, 1, f16, bf16, 1.0, True, "smooth_l1"),
    (100, 1, 3, f16, f16, 2.0, False, "mse"),
    (768, 13, 1, f32, f32, 0.5, True, "smooth_l1"),
    (2048, 147, 3, f32, f32, 1.0, True, "mse"),
    (1024, 147, 1, f32, f32, 2.0, False, "smooth_l1"),
    (64, 13, 3, f32, f32, 0.5, False, "mse"),
    (1, 147, 3, bf16, f32, 1.0, False, "smooth_l1"),
    (768, 147, 2, bf16, "cl", 2.0, False, "smooth_l1"),
    (1280, 13, 3, bf16, "cl", 1.0, True, "mse"),
    (100, 147, 1, f32, "cl", 0.5, True, "smooth_l1"),
    (2048, 13, 2, bf16, "cl", 2.0, False, "mse"),
]
N_OF_M = {1: 4, 13: 17, 147: 196}


def _case_id(c):
    C, M, B, pdt, tdt, beta, gather, kind = c
    name = {f32: "f32", bf16: "bf16", f16: "f16", "cl": "bf16cl"}
    return f"C{C}-M{M}-B{B}-{name[pdt]}x{name[tdt]}-beta{beta}-{'BNC' if gather else 'BMC'}-{kind}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, device):
    C, M, B, pdt, tdt, beta, gather, kind = case
    pred32, target32, ids = _inputs(B, N_OF_M[M], M, C, gather, device, seed=C + M + B)
    pred = pred32.to(pdt)
    target = _channels_last_target(target32, bf16) if tdt == "cl" else target32.to(tdt)
    out, out_grad = _run(masked_feature_loss, pred, target, ids, beta, kind)
    assert out.dtype == torch.float32 and out.shape == ()
    assert out_grad.dtype == pdt and out_grad.shape == pred.shape
    truth, truth_grad = _truth(pred32, target32, ids, beta, kind)
    if pdt == tdt == f32:
        torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_grad.double(), truth_grad, atol=1e-5, rtol=1e-5)
        return
    # three-way rule: the kernel's error vs the fp64 truth is at most twice the error that
    # rounding the inputs to these dtypes already causes in the (fp32) reference
    ref_lo, ref_lo_grad = _run(masked_feature_loss_ref, pred, target, ids, beta, kind)
    assert (out.double() - truth).abs() <= 2 * (ref_lo.double() - truth).abs() + 1e-5
    # and, since both compute in fp32 from the same rounded inputs: tight to ref_lo
    torch.testing.assert_close(out, ref_lo, atol=1e-5, rtol=1e-5)
    # smooth-L1's scaled grad is in [-1, 1]: one ulp at 1.0; mse's, 2d, is unbounded: two ulps
    # of it (one from the kernel, one from scaling by B*M*C in pred's dtype above)
    rtol = 2 * GRAD_ATOL[pdt] if kind == "mse" else 0.0
    torch.testing.assert_close(out_grad.float(), ref_lo_grad.float(), atol=GRAD_ATOL[pdt], rtol=rtol)
    err = (out_grad.double() - truth_grad).abs()
    bound = 2 * (ref_lo_grad.double() - truth_grad).abs() + GRAD_ATOL[pdt] + rtol * truth_grad.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_out", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("pdt, tdt, gather", [(f32, f32, True), (bf16, "cl", False)])
def test_grad_computed_in_forward_scaled_by_grad_out(grad_out, pdt, tdt, gather, device):
    """The gradient is stored by forward for g = 1; backward rescales it on the device only
    when g != 1 (g = 1: untouched; g = 0: all zeros)."""
    pred32, target32, ids = _inputs(2, 196, 147, 1024, gather, device, seed=5)
    pred = pred32.to(pdt)
    target = _channels_last_target(target32, bf16) if tdt == "cl" else target32
    out, out_grad = _run(masked_feature_loss, pred, target, ids, 2.0, grad_out=grad_out)
    ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 2.0, grad_out=grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad.float(), ref_grad.float(), atol=GRAD_ATOL[pdt], rtol=0)
    if grad_out == 0.0:
        assert out_grad.abs().max() == 0
    truth, truth_grad = _truth(pred32, target32, ids, 2.0, grad_out=grad_out)
    err = (out_grad.double() - truth_grad).abs()
    assert (err <= 2 * (ref_grad.double() - truth_grad).abs() + GRAD_ATOL[pdt]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_target_is_read_where_it_lies(device):
    """A channels_last bf16 map and a (B, C, h, w)-contiguous one (channel stride N) go to the
    kernel as they are: the launcher passes the caller's tensor, no copy."""
    pred, target32, ids = _inputs(2, 49, 36, 96, False, device)
    B, N, C = target32.shape
    nchw = target32.transpose(1, 2).contiguous().to(bf16).reshape(B, C, 7, 7)  # (B, C, h, w)
    for target in (_channels_last_target(target32, bf16), nchw.flatten(2).transpose(1, 2)):
        _, args, _, _, _ = mfl.fwd_launch_args(pred, target, ids, 2.0, 1e-6, "smooth_l1", True, False)
        assert args[1] is target
        out, out_grad = _run(masked_feature_loss, pred, target, ids, 2.0)
        ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 2.0)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_all_patches_masked_gathers(device):
    """M == N: pred.shape[1] == N wins, so pred is read through ids_masked (a permutation)."""
    pred, target, ids = _inputs(2, 9, 9, 24, True, device)
    out, out_grad = _run(masked_feature_loss, pred, target, ids, 1.0)
    ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, chunk", [(100, 16), (8193, mfl.BLOCK_C_INTERPRET)])
def test_chunked_rows(C, chunk, device, monkeypatch):
    """Rows of several column chunks: the stats merged chunk by chunk; a ragged last chunk.
    (On GPU every C > 256 runs this way; the interpreter's chunk is made small here.)"""
    if device == "cpu":
        monkeypatch.setattr(mfl, "BLOCK_C_INTERPRET", chunk)
    for gather in (True, False):
        pred, target, ids = _inputs(2, 17, 13, C, gather, device, seed=C)
        target = target * 3 + 100  # a large offset: a one-pass sum of squares would cancel
        out, out_grad = _run(masked_feature_loss, pred, target, ids, 2.0)
        truth, truth_grad = _truth(pred, target, ids, 2.0)
        torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_grad.double(), truth_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_target_row_is_finite(device):
    """Variance 0: t_hat = 0 * rstd with rstd = 1/sqrt(eps); loss and grad stay finite."""
    pred, target, ids = _inputs(2, 17, 13, 100, True, device)
    target[0, ids[0, :4]] = torch.tensor([0.0, 0.1, 3.0, -7.25], device=device)[:, None]
    out, out_grad = _run(masked_feature_loss, pred, target, ids, 2.0)
    ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 2.0)
    assert torch.isfinite(out) and torch.isfinite(out_grad).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pdt, tdt, gather", [(f32, f32, True), (bf16, f32, False)])
def test_bitwise_deterministic(pdt, tdt, gather, device):
    pred, target, ids = _inputs(3, 196, 147, 768, gather, device)
    pred, target = pred.to(pdt), target.to(tdt)
    first = _run(masked_feature_loss, pred, target, ids, 2.0)
    second = _run(masked_feature_loss, pred, target, ids, 2.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta, kind", [(10.0, "smooth_l1"), (0.05, "smooth_l1"), (1.0, "mse")])
def test_gradcheck(beta, kind, device):
    """Finite differences on a tiny case. The contract computes in fp32 whatever the input
    dtype (float64 inputs included), so a float64 gradcheck would only measure fp32
    rounding: this runs in fp32 with a matching eps and tolerances, on data kept off the
    |d| == beta kink: all quadratic (beta 10) or all linear (beta 0.05)."""
    _, target, ids = _inputs(2, 5, 3, 6, True, device)
    g = torch.Generator().manual_seed(1)
    t_hat = F.layer_norm(gather_rows(target, ids), (6,), eps=1e-6)  # (B, M, C)
    sign = torch.where(torch.rand(t_hat.shape, generator=g) < 0.5, -1.0, 1.0).to(device)
    offset = (0.3 + torch.rand(t_hat.shape, generator=g)).to(device)
    pred = (t_hat + sign * offset).requires_grad_(True)  # (B, M, C), |d| in [0.3, 1.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a double precision" input
        assert torch.autograd.gradcheck(
            lambda p: masked_feature_loss(p, target, ids, beta=beta, kind=kind), (pred,), eps=1e-2, atol=1e-4,
            rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_computes_in_fp32_like_reference(device):
    pred, target, ids = _inputs(3, 17, 13, 100, False, device)
    out, out_grad = _run(masked_feature_loss, pred.double(), target.double(), ids, 1.0)
    ref, ref_grad = _run(masked_feature_loss_ref, pred.double(), target.double(), ids, 1.0)
    assert out.dtype == ref.dtype == torch.float32 and out_grad.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ids_layout_and_strides(device):
    """int32 ids with a stride, pred rows strided in memory, target with a strided last dim,
    target requiring grad (it gets none, like the reference's detach)."""
    B, N, M, C = 2, 17, 5, 33
    pred_big, target, ids64 = _inputs(B, N, 2 * M, C + 7, True, device)
    pred = pred_big[:, :, :C]                         # (B, N, C), stride(1) = C + 7
    ids = ids64.to(torch.int32)[:, ::2]               # (B, M), stride(1) = 2
    target_t = target[:, :, :C].transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) = N
    target_t.requires_grad_(True)
    out, out_grad = _run(masked_feature_loss, pred, target_t, ids, 1.0)
    ref, ref_grad = _run(masked_feature_loss_ref, pred, target_t, ids.long(), 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert target_t.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_grad_out_and_no_masked_rows(device):
    pred, target, ids = _inputs(2, 17, 13, 40, True, device)
    p1 = pred.clone().requires_grad_(True)
    (3.5 * masked_feature_loss(p1, target, ids)).backward()
    p2 = pred.clone().requires_grad_(True)
    (3.5 * masked_feature_loss_ref(p2, target, ids)).backward()
    torch.testing.assert_close(p1.grad, p2.grad, atol=1e-8, rtol=1e-5)
    # M = 0: mean over nothing is nan, like the reference; the gradient is all zeros
    empty = ids[:, :0]
    p3 = pred.clone().requires_grad_(True)
    out = masked_feature_loss(p3, target, empty)
    assert torch.isnan(out) and torch.isnan(masked_feature_loss_ref(pred, target, empty))


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_second_backward(device):
    pred, target, ids = _inputs(2, 17, 13, 40, False, device)
    with torch.no_grad():  # evaluation: no gradient is computed or stored
        out = masked_feature_loss(pred.clone().requires_grad_(True), target, ids)
    torch.testing.assert_close(out, masked_feature_loss_ref(pred, target, ids), atol=1e-5, rtol=1e-5)
    # a second backward through one graph (retain_graph) recomputes the gradient: the first
    # one was handed over to autograd
    p = pred.clone().requires_grad_(True)
    loss = masked_feature_loss(p, target, ids)
    (2 * loss).backward(retain_graph=True)
    first = p.grad.clone()
    p.grad = None
    (0.5 * loss).backward()
    torch.testing.assert_close(4 * p.grad, first, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_ids_poison_the_loss_without_a_host_check(device):
    """What CUDA does (no host sync): a row whose id is outside [0, N) is not read, and the
    loss and that row's gradient are NaN; the other rows' gradients are untouched. The
    launcher is called directly here: on CPU the public op checks on the host and raises."""
    pred, target, ids = _inputs(2, 17, 13, 40, False, device)
    bad = ids.clone()
    bad[1, 3] = 17
    bad[0, 5] = -1
    loss, grad = mfl._fwd_launch(pred, target, bad, 2.0, 1e-6, "smooth_l1", True, False)
    assert torch.isnan(loss)
    assert torch.isnan(grad[1, 3]).all() and torch.isnan(grad[0, 5]).all()
    ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 2.0)[1] / (ids.numel() * 40)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[1, 3] = keep[0, 5] = False
    torch.testing.assert_close(grad[keep], ref_grad[keep], atol=1e-8, rtol=1e-5)
    if device == "cuda":  # the public op on CUDA: NaN, no exception
        assert torch.isnan(masked_feature_loss(pred, target, bad))


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    pred, target, ids = _inputs(1, 6, 3, 8, True, device)
    with pytest.raises(ValueError, match="beta must be > 0"):
        masked_feature_loss(pred, target, ids, beta=0.0)
    with pytest.raises(ValueError, match="expected N=6"):
        masked_feature_loss(pred[:, :4], target, ids)
    with pytest.raises(ValueError, match="does not match target"):
        masked_feature_loss(pred[:, :, :5], target, ids)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        masked_feature_loss(pred.int(), target, ids)
    with pytest.raises(TypeError, match="int64 or int32"):
        masked_feature_loss(pred, target, ids.float())
    with pytest.raises(ValueError, match="kind must be one of"):
        masked_feature_loss(pred, target, ids, kind="l2")
    if device == "cpu":
        with pytest.raises(IndexError, match="out of range"):
            masked_feature_loss(pred, target, ids + 6)
