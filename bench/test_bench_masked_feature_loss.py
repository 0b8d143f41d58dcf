"""Benchmark of the masked feature loss: reference eager vs torch.compile(reference) vs
the fused Triton kernel, forward and forward+backward.

    pytest bench/test_bench_masked_feature_loss.py --benchmark-only [--benchmark-json=bench/results/X.json]

Every case first asserts parity with the eager reference, then times. extra_info holds:
bytes (the explicit formula below), achieved GB/s, % of the device's HBM bound (H100
3.35e12 B/s, H200 4.8e12 B/s; none on CPU), peak extra memory (CUDA), ratios vs eager
and vs compiled (on the Triton row).

Bytes: R = B*M masked rows, P / T = bytes per element of pred / target. The floor any
implementation needs, used for GB/s so that all rows are comparable:
    forward             R*C*(P + T)        read the masked pred and target rows
    forward + backward  R*C*(P + T + P)    ... and write grad_pred (DESIGN.md's roofline)
The fused kernel itself moves R*C*(P+T) forward and R*C*(2P+T) backward ("kernel_bytes").

On CPU the Triton kernel runs in Triton's numpy interpreter: it is timed at a tiny shape
and labelled "interpreted, not a speed figure".
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` is first imported

from kernels import TRITON_AVAILABLE, masked_feature_loss, masked_feature_loss_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
PRED_DTYPE, TARGET_DTYPE = torch.bfloat16, torch.float32  # bf16 student, fp32 teacher features
# the trainer's shapes on GPU (B=256, N=196, M=147); a small batch on CPU
B, N, M = (256, 196, 147) if CUDA else (8, 196, 147)
CHANNELS = (768, 1024, 2048) if CUDA else (768,)
B_INTERPRETED = 1  # Triton under the CPU interpreter: a tiny batch, not a speed figure

_compiled_ref = torch.compile(masked_feature_loss_ref)
IMPLS = {"eager": masked_feature_loss_ref, "compiled": _compiled_ref, "triton": masked_feature_loss}
_medians = {}  # (group, impl) -> median seconds, for the ratios on the triton row


def _device_bound():
    if not CUDA:
        return None, f"cpu ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None), name


def _inputs(b, c, layout):
    g = torch.Generator().manual_seed(c)
    target = torch.randn(b, N, c, generator=g).to(DEVICE, TARGET_DTYPE)  # (B, N, C)
    ids = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(b)]).to(DEVICE)  # (B, M)
    n_pred = N if layout == "BNC" else M
    pred = torch.randn(b, n_pred, c, generator=g).to(DEVICE, PRED_DTYPE).requires_grad_(True)  # (B, N|M, C)
    return pred, target, ids


def _step(fn, mode, pred, target, ids):
    def run():
        loss = fn(pred, target, ids)
        out = (loss,) if mode == "fwd" else (loss, *torch.autograd.grad(loss, pred))
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


def _cases():
    for c in CHANNELS:
        for layout in ("BMC", "BNC") if (CUDA and c == CHANNELS[0]) else ("BMC",):
            for mode in ("fwd", "fwd_bwd"):
                for impl in IMPLS:
                    yield pytest.param(impl, mode, c, layout, id=f"{mode}-C{c}-{layout}-{impl}")


@pytest.mark.parametrize("impl, mode, c, layout", list(_cases()))
def test_bench_masked_feature_loss(benchmark, impl, mode, c, layout):
    interpreted = impl == "triton" and not CUDA
    if impl == "triton":
        if not TRITON_AVAILABLE:
            pytest.skip("triton is not importable: no Triton column")
        if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernel cannot run here")
    b = B_INTERPRETED if interpreted else B
    pred, target, ids = _inputs(b, c, layout)
    run = _step(IMPLS[impl], mode, pred, target, ids)

    # parity first (this also compiles / autotunes outside the timing)
    want = _step(masked_feature_loss_ref, mode, pred, target, ids)()
    got = run()
    numel = b * M * c
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    if mode == "fwd_bwd":  # grads scaled to O(1): one bf16 ulp
        torch.testing.assert_close(got[1].float() * numel, want[1].float() * numel, rtol=0, atol=2.0 ** -7)

    peak_extra = None
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak_extra = torch.cuda.max_memory_allocated() - base

    group = f"{mode}-C{c}-{layout}"
    benchmark.group = group
    benchmark.pedantic(run, rounds=5 if interpreted else 20, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the parity check above is the test
        return
    median = benchmark.stats.stats.median
    _medians[(group, impl)] = median

    P, T = pred.element_size(), target.element_size()
    rows_x_c = numel
    floor_bytes = rows_x_c * (P + T) if mode == "fwd" else rows_x_c * (2 * P + T)
    bound, device = _device_bound()
    info = {
        "device": device,
        "shape": f"B={b} N={N} M={M} C={c} pred {layout} {PRED_DTYPE} target {TARGET_DTYPE}",
        "bytes": floor_bytes,
        "bytes_formula": "R*C*(P+T)" if mode == "fwd" else "R*C*(2P+T)",
        "GB/s": floor_bytes / median / 1e9,
    }
    if bound:
        info["pct_of_hbm_bound"] = 100 * floor_bytes / median / bound
        info["bound_us"] = floor_bytes / bound * 1e6
    if peak_extra is not None:
        info["peak_extra_MB"] = peak_extra / 2 ** 20
    if impl == "triton":
        info["kernel_bytes"] = rows_x_c * (P + T) if mode == "fwd" else rows_x_c * (3 * P + 2 * T)
        if interpreted:
            info["note"] = "interpreted, not a speed figure (TRITON_INTERPRET=1 on CPU, tiny batch)"
        else:
            for other in ("eager", "compiled"):
                if (group, other) in _medians:
                    info[f"speedup_vs_{other}"] = _medians[(group, other)] / median
    benchmark.extra_info.update(info)
