"""Benchmark of the attention backends (math reference, sdpa, xformers) at ViT shapes, fwd+bwd.

    pytest bench/test_bench_attention.py --benchmark-only [--benchmark-json=bench/results/X.json]

q, k, v: (B, H, T, hd). Every case first asserts parity with `math` (output and dq, dk, dv),
then times forward + backward (CUDA-synchronized) and reports TFLOP/s from:
    forward          4 * B * H * T^2 * hd     (q k^T and p v: 2 FLOPs per multiply-add)
    forward+backward 3.5 * forward            (flash-attention's convention: backward = 2.5x
                                               forward, its recomputation of q k^T included)
The same count is used for every backend so the figures compare time; for math, which does
not recompute, it overstates the useful work by 0.5x forward. % of peak is against the
device's dense bf16 figure (H100 / H200: 989e12 FLOP/s); none on CPU.

CPU: fp32, small ViT-tiny / MAE-decoder shapes. CUDA: bf16, ViT-B / L / H shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from img2vec.fastpaths import resolve_attn

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak
# name -> (B, H, T, hd); T = visible + cls (encoder, mask 0.75) or all patches + cls (decoder, full)
SHAPES = {
    "vit_base_enc_visible": (256, 12, 50, 64),
    "vit_base_full": (128, 12, 197, 64),
    "vit_large_full": (64, 16, 197, 64),
    "vit_huge14_full": (64, 16, 257, 80),
    "mae_decoder": (256, 16, 197, 32),
} if CUDA else {
    "vit_tiny_enc_visible": (8, 3, 50, 64),
    "vit_tiny_full": (4, 3, 197, 64),
    "mae_decoder": (2, 16, 197, 32),
}
ROUNDS = 20 if CUDA else 15
pytestmark = pytest.mark.usefixtures("bench_cpu_threads")  # bench/conftest.py


_medians = {}  # (shape, impl) -> seconds


def attn_math(q, k, v):  # (B, H, T, hd) each -> (B, H, T, hd); the reference, as vit.Attention's math path
    p = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    return p.softmax(dim=-1) @ v


def attn_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attn_xformers(q, k, v):
    import xformers.ops as xops

    # xformers takes (B, T, H, hd): transposed views, no copy
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


IMPLS = {"math": attn_math, "sdpa": attn_sdpa, "xformers": attn_xformers}


def _inputs(shape, dtype=DTYPE):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(True) for _ in range(3))
    do = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do):
    def run():
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do)
        if CUDA:
            torch.cuda.synchronize()
        return (out, *grads)
    return run


def _check_parity(impl, shape):
    """fp32 on CPU: tight; bf16 on CUDA: each result within 2x the bf16 math error of fp32 + atol."""
    q, k, v, do = _inputs(shape)
    got = _fwd_bwd(IMPLS[impl], q, k, v, do)()
    ref = _fwd_bwd(attn_math, q, k, v, do)()
    if not CUDA:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{impl} {name}: {m}")
        return
    truth = _fwd_bwd(attn_math, *(t.detach().float().requires_grad_(True) for t in (q, k, v)), do.float())()
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        a, b, t = a.float(), b.float(), t.float()
        atol = 1e-2 * t.abs().max().item()
        excess = ((a - t).abs() - 2 * (b - t).abs() - atol).max().item()
        assert excess <= 0, f"{impl} {name}: beyond 2x the bf16 math error by {excess:.3g}"


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_attention(benchmark, impl, shape_name):
    if impl == "xformers":
        try:
            resolve_attn("xformers", torch.device(DEVICE))
        except RuntimeError as e:
            pytest.skip(str(e))
    shape = SHAPES[shape_name]
    _check_parity(impl, shape)  # parity first; this also warms the kernels up
    run = _fwd_bwd(IMPLS[impl], *_inputs(shape))
    peak_mem = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak_mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.group = f"attention-{shape_name}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the parity check was the test
        return
    B, H, T, hd = shape
    flops = 3.5 * 4 * B * H * T * T * hd
    median = benchmark.stats.stats.median
    _medians[shape_name, impl] = median
    name = torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)"
    info = {"device": name, "shape": f"B={B} H={H} T={T} hd={hd} {str(DTYPE).replace('torch.', '')}",
            "flops_formula": "3.5 * 4*B*H*T^2*hd (fwd+bwd)", "flops": flops,
            "TFLOP/s": flops / median / 1e12}
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak:
        info["pct_of_peak"] = 100 * flops / median / peak
    if peak_mem is not None:
        info["peak_extra_MiB"] = peak_mem
    if impl != "math" and (shape_name, "math") in _medians:
        info["speedup_vs_math"] = _medians[shape_name, "math"] / median
    benchmark.extra_info.update(info)
