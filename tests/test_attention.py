"""Attention backends against the `math` reference, activation checkpointing, and torch.compile.

    math      explicit softmax(q k^T / sqrt(hd)) v                   the reference
    sdpa      F.scaled_dot_product_attention (flash / cuDNN / efficient / CPU flash)
    xformers  xformers.ops.memory_efficient_attention, only where its ops run (never on CPU)

Values and gradients (input and every weight) are compared in fp32 on CPU; in bf16 on CUDA
(marked `cuda`) with the three-way rule |out - ref_fp32| <= 2 |math_bf16 - ref_fp32| + atol:
a backend may be as far from the fp32 truth as the bf16 reference is, twice over.
"""
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from img2vec.fastpaths import resolve_attn
from img2vec.masking import random_masking
from img2vec.vit import Attention, Decoder, Img2VecStudent, VitEncoder
from kernels.reference import masked_feature_loss_ref

CUDA = torch.cuda.is_available()
# (B, T, D, H): one token, a prime T, ViT-tiny's 65 visible+cls and 197 tokens, one head, hd 64/32/8
SHAPES = [(1, 1, 64, 1), (2, 17, 96, 3), (2, 65, 192, 3), (1, 197, 128, 4), (3, 50, 64, 8)]


def _backends(device):
    """(name, None) if it runs here, else (name, why not)."""
    out = [("sdpa", None)]
    try:
        resolve_attn("xformers", torch.device(device))
        out.append(("xformers", None))
    except RuntimeError as e:
        out.append(("xformers", str(e)))
    return out


def _pair(impl, D, H, device, dtype, seed=0):
    torch.manual_seed(seed)
    ref = Attention(D, H, impl="math").to(device, dtype)
    other = Attention(D, H, impl=impl).to(device, dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _run(module, x):
    """Output and the gradients of input and weights for a fixed random upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)  # (B, T, D)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(g)
    grads = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return out.detach(), grads


@pytest.mark.parametrize("B, T, D, H", SHAPES)
@pytest.mark.parametrize("impl, why_not", _backends("cpu"), ids=lambda v: v if isinstance(v, str) else "")
def test_backend_matches_math_fp32_cpu(impl, why_not, B, T, D, H):
    if why_not:
        pytest.skip(why_not)
    ref, other = _pair(impl, D, H, "cpu", torch.float32)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    want_out, want = _run(ref, x)
    got_out, got = _run(other, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B, T, D, H", [(8, 197, 768, 12), (4, 257, 1280, 16), (2, 50, 1024, 16), (3, 17, 96, 3)])
@pytest.mark.parametrize("impl", ["sdpa", "xformers"])
def test_backend_matches_math_bf16_cuda(impl, B, T, D, H):
    why_not = dict(_backends("cuda"))[impl]
    if why_not:
        pytest.skip(why_not)
    ref32, _ = _pair(impl, D, H, "cuda", torch.float32)
    ref16, other = _pair(impl, D, H, "cuda", torch.bfloat16)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    truth_out, truth = _run(ref32, x.cuda())
    ref_out, ref = _run(ref16, x.cuda().bfloat16())
    got_out, got = _run(other, x.cuda().bfloat16())

    def three_way(a, b, t, what):  # |a - t| <= 2 |b - t| + atol, elementwise, in fp32
        a, b, t = a.float(), b.float(), t.float()
        atol = 1e-2 * t.abs().max().item() + 1e-3
        excess = ((a - t).abs() - 2 * (b - t).abs() - atol).max().item()
        assert excess <= 0, f"{impl} {what}: exceeds 2x the bf16 math error by {excess:.3g}"

    three_way(got_out, ref_out, truth_out, "output")
    for name in truth:
        three_way(got[name], ref[name], truth[name], f"grad {name}")


def _student(attn="sdpa", grad_ckpt=0, depth=3, seed=0):
    """A cut-down vit_tiny-style student (width 64, `depth` blocks, patch 16 at 64 px: N = 16),
    built from the classes build_student uses; C = 32 teacher channels."""
    torch.manual_seed(seed)
    enc = VitEncoder(64, 16, 64, depth=depth, heads=2, attn_impl=attn, grad_ckpt=grad_ckpt)
    return Img2VecStudent(enc, Decoder(enc.grid, 64, 64, 1, 2, 32, attn_impl=attn))


def _batch(B=3, N=16, C=32):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, 3, 64, 64, generator=g)
    target = torch.randn(B, N, C, generator=g)
    return images, target, random_masking(B, N, 0.75, generator=g)


def _loss(student, images, target, mask):
    pred = student(images, mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
    return masked_feature_loss_ref(pred, target, mask.ids_masked)


@pytest.mark.parametrize("attn", ["sdpa", "math"])
@pytest.mark.parametrize("grad_ckpt", [1, 3])
def test_grad_ckpt_gives_the_same_grads(attn, grad_ckpt):
    plain, ckpt = _student(attn, 0), _student(attn, grad_ckpt)
    ckpt.load_state_dict(plain.state_dict())
    images, target, mask = _batch()
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = _loss(model, images, target, mask)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


class _CountLayerNorms(TorchDispatchMode):
    """Counts forward layer norms: a checkpointed block runs its two again in backward."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten.native_layer_norm.default
        return func(*args, **(kwargs or {}))


def test_grad_ckpt_recomputes_only_in_training():
    images, target, mask = _batch()
    counts = {}
    for k, mode in ((0, "train"), (3, "train"), (3, "eval")):
        model = _student("sdpa", k).train(mode == "train")
        with _CountLayerNorms() as c:
            if mode == "train":
                _loss(model, images, target, mask).backward()
            else:
                with torch.no_grad():
                    _loss(model, images, target, mask)
        counts[k, mode] = c.n
    assert counts[3, "train"] == counts[0, "train"] + 2 * 3  # norm1 + norm2 of each block, again
    assert counts[3, "eval"] == counts[0, "train"]  # no checkpointing outside training


@pytest.mark.e2e  # inductor compiles C++ in gcc subprocesses: ~4 s with a warm cache, ~50 s cold
def test_compiled_student_matches_eager(record_property):
    """torch.compile (inductor; C++ through gcc on CPU) of the student: loss and grads equal eager.

    The student is cut to 2 encoder blocks (the same classes as build_student's). Compiling its
    forward + backward cold (empty inductor cache) takes 50-56 s on the shared 2-core CPU
    machine, ~4 s warm; the 12-block vit_tiny took ~60 s (recorded as compile_s)."""
    def tiny():
        return _student("sdpa", depth=2)

    eager, compiled_model = tiny(), tiny()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    images, target, mask = _batch()
    want = _loss(eager, images, target, mask)
    want.backward()
    t0 = time.perf_counter()
    got = _loss(compiled, images, target, mask)
    got.backward()
    record_property("compile_s", round(time.perf_counter() - t0, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
