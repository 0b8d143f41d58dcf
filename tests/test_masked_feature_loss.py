"""Parity of the fused masked feature loss (kernels/masked_feature_loss.py) with its
reference (kernels/reference.py): values and pred gradients, every dtype pair, both pred
layouts, awkward shapes. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set here when there is no GPU and the caller did not set it); `cuda` twins run compiled.

The shape/dtype/beta/layout axes are covered pairwise (every value of every axis at least
once, every pred x target dtype pair) instead of their full product, to keep the file fast.
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


def _run(fn, pred, target, ids, beta):
    """loss and grad of pred (scaled by B*M*C so that values are O(1))."""
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(pred, target, ids, beta=beta)
    loss.backward()
    return loss.detach(), pred.grad * (ids.numel() * target.shape[-1])


# (C, M, B, pred dtype, target dtype, beta, gather): pairwise cover of the axes
CASES = [
    (1, 1, 1, f32, f32, 2.0, True),
    (7, 13, 3, f32, bf16, 0.5, False),
    (64, 147, 1, f32, f16, 1.0, True),
    (100, 13, 3, bf16, f32, 1.0, True),
    (768, 147, 3, bf16, bf16, 2.0, False),
    (1024, 1, 3, bf16, f16, 0.5, True),
    (2048, 13, 1, f16, f32, 0.5, False),
    (7, 147, 1, f16, bf16, 1.0, True),
    (100, 1, 3, f16, f16, 2.0, False),
    (768, 13, 1, f32, f32, 0.5, True),
    (2048, 147, 3, f32, f32, 1.0, True),
    (1024, 147, 1, f32, f32, 2.0, False),
    (64, 13, 3, f32, f32, 0.5, False),
    (1, 147, 3, bf16, f32, 1.0, False),
]
N_OF_M = {1: 4, 13: 17, 147: 196}


def _case_id(c):
    C, M, B, pdt, tdt, beta, gather = c
    name = {f32: "f32", bf16: "bf16", f16: "f16"}
    return f"C{C}-M{M}-B{B}-{name[pdt]}x{name[tdt]}-beta{beta}-{'BNC' if gather else 'BMC'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, device):
    C, M, B, pdt, tdt, beta, gather = case
    pred32, target32, ids = _inputs(B, N_OF_M[M], M, C, gather, device, seed=C + M + B)
    pred, target = pred32.to(pdt), target32.to(tdt)
    out, out_grad = _run(masked_feature_loss, pred, target, ids, beta)
    assert out.dtype == torch.float32 and out.shape == ()
    assert out_grad.dtype == pdt and out_grad.shape == pred.shape
    if pdt == tdt == f32:
        ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, beta)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)
        return
    # three-way rule: the kernel's error vs the fp32 truth is at most twice the error that
    # rounding the inputs to these dtypes already causes in the reference
    ref32, ref32_grad = _run(masked_feature_loss_ref, pred32, target32, ids, beta)
    ref_lo, ref_lo_grad = _run(masked_feature_loss_ref, pred, target, ids, beta)
    assert (out - ref32).abs() <= 2 * (ref_lo - ref32).abs() + 1e-5
    # and, since both compute in fp32 from the same rounded inputs: tight to ref_lo
    torch.testing.assert_close(out, ref_lo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad.float(), ref_lo_grad.float(), atol=GRAD_ATOL[pdt], rtol=0)
    err = (out_grad.float() - ref32_grad).abs()
    bound = 2 * (ref_lo_grad.float() - ref32_grad).abs() + GRAD_ATOL[pdt]
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_all_patches_masked_gathers(device):
    """M == N: pred.shape[1] == N wins, so pred is read through ids_masked (a permutation)."""
    pred, target, ids = _inputs(2, 9, 9, 24, True, device)
    out, out_grad = _run(masked_feature_loss, pred, target, ids, 1.0)
    ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, max_fused, chunk", [(100, 16, 16), (8193, mfl.MAX_FUSED_C, mfl.CHUNK_C)])
def test_chunked_rows(C, max_fused, chunk, device, monkeypatch):
    """Rows wider than MAX_FUSED_C loop over C (three passes); a ragged last chunk."""
    monkeypatch.setattr(mfl, "MAX_FUSED_C", max_fused)
    monkeypatch.setattr(mfl, "CHUNK_C", chunk)
    for gather in (True, False):
        pred, target, ids = _inputs(2, 17, 13, C, gather, device, seed=C)
        out, out_grad = _run(masked_feature_loss, pred, target, ids, 2.0)
        ref, ref_grad = _run(masked_feature_loss_ref, pred, target, ids, 2.0)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_grad, ref_grad, atol=1e-5, rtol=1e-5)


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
@pytest.mark.parametrize("beta", [10.0, 0.05])
def test_gradcheck(beta, device):
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
            lambda p: masked_feature_loss(p, target, ids, beta=beta), (pred,), eps=1e-2, atol=1e-4, rtol=1e-2)


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
    if device == "cpu":
        with pytest.raises(IndexError, match="out of range"):
            masked_feature_loss(pred, target, ids + 6)
