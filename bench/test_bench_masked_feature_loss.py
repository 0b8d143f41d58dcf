"""Benchmark of the masked feature loss as users call it and as the GPU runs it: reference
eager vs torch.compile(reference) vs the fused Triton op (forward + backward through autograd),
and the op's two kernels alone.

    pytest bench/test_bench_masked_feature_loss.py --benchmark-only [--benchmark-json=X.json]

Every case first asserts parity with the eager reference (loss, and the pred gradient to one
ulp of pred's dtype), then times. On CUDA: CUDA events around N_CALLS back-to-back calls
(no sync in between), median over rounds, plus `triton.testing.do_bench` (which flushes L2
before each call: a cold-cache figure). pytest-benchmark's own stats time one burst of
N_CALLS calls plus one synchronize (host clock).

Bytes, R = B*M masked rows, P / T / I bytes per element of pred / target / ids:
    bound        R*C*(2P + T)      the least any implementation moves: read the masked pred
                                   and target rows once, write grad_pred once (8 B/element for
                                   bf16 pred, fp32 target; 6 B for a bf16 target)
    BMC layout   bound + R*(I + 4)              ids, the per-row loss sums
    BNC layout   bound + R*(I + 4) + B*N*C*P    ... and the zero fill of the unmasked rows
    fwd kernel   as the layout, less the zero fill (the launcher's torch.zeros)
    bwd kernel   0 when grad_out == 1 (every program exits); 2P per grad element otherwise
pct_of_hbm_bound = (bound / HBM bandwidth) / time: H100 3.35e12 B/s, H200 4.8e12 B/s (the
bound used is written in each row's extra_info["bound"]). GB/s is bound bytes / time for the
autograd rows (comparable across implementations) and the kernel's own bytes / time for the
kernel rows.

Each finished case is also appended as one JSON line to $IMG2VEC_BENCH_JSONL when set (the
device check reads it: a killed run keeps the cases before it).

On CPU the Triton kernel runs in Triton's numpy interpreter: it is checked for parity and
timed at a tiny batch, in a group of its own ("-interpreted-B<b>"), labelled "interpreted, not a
speed figure", with no GB/s.
"""
import importlib
import json
import os
import statistics

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` is first imported

from kernels import TRITON_AVAILABLE, masked_feature_loss, masked_feature_loss_ref  # noqa: E402

mfl = importlib.import_module("kernels.masked_feature_loss") if TRITON_AVAILABLE else None

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
PRED_DTYPE = torch.bfloat16  # bf16 student
# the trainer's shapes on GPU (B=256, N=196, M=147); a small batch on CPU
B, N, M = (256, 196, 147) if CUDA else (8, 196, 147)
CHANNELS = (768, 1024, 2048) if CUDA else (768,)
B_INTERPRETED = 1  # Triton under the CPU interpreter: a tiny batch, not a speed figure
N_CALLS, ROUNDS = (20, 5) if CUDA else (1, 3)

_compiled = []  # torch.compile(reference), made on first use (importing dynamo takes seconds)


def _compiled_ref(*args, **kwargs):
    if not _compiled:
        _compiled.append(torch.compile(masked_feature_loss_ref))
    return _compiled[0](*args, **kwargs)


AUTOGRAD_IMPLS = {"eager": masked_feature_loss_ref, "compiled": _compiled_ref, "triton": masked_feature_loss}
_medians = {}  # (group, impl) -> median seconds per call, for the ratios on the triton row


def _device_bound():
    if not CUDA:
        return None, f"cpu ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None), name


def _inputs(b, c, layout, target_kind):
    """pred (B, N|M, C) bf16 leaf, target (B, N, C) fp32 or a bf16 channels_last view, ids (B, M)."""
    g = torch.Generator(device=DEVICE).manual_seed(c)
    if target_kind == "f32":
        target = torch.randn(b, N, c, generator=g, device=DEVICE)  # (B, N, C)
    else:  # the teacher's map: (B, C, 14, 14) bf16 channels_last, viewed as (B, N, C), no copy
        fmap = torch.randn(b, 14, 14, c, generator=g, device=DEVICE, dtype=torch.bfloat16).permute(0, 3, 1, 2)
        target = fmap.flatten(2).transpose(1, 2)  # (B, N, C), stride(-1) == 1
    ids = torch.argsort(torch.rand(b, N, generator=g, device=DEVICE), dim=1)[:, :M].contiguous()  # (B, M)
    pred = torch.randn(b, N if layout == "BNC" else M, c, generator=g, device=DEVICE, dtype=PRED_DTYPE)
    return pred.requires_grad_(True), target, ids


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _fwd_bwd(fn, pred, target, ids):
    def run():
        loss = fn(pred, target, ids)
        return loss, torch.autograd.grad(loss, pred)[0]
    return run


def _time_calls(call):
    """Median seconds per call: CUDA events around N_CALLS back-to-back calls (host clock on CPU)."""
    import time

    per_call = []
    for _ in range(ROUNDS):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(N_CALLS):
                call()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / 1e3 / N_CALLS)
        else:
            t0 = time.perf_counter()
            for _ in range(N_CALLS):
                call()
            per_call.append((time.perf_counter() - t0) / N_CALLS)
    return statistics.median(per_call), per_call


def _record(benchmark, group, impl, call, info, case):
    """Time `call`, fill extra_info, append the JSON line named `case` (the test id); returns seconds per call."""
    def burst():
        for _ in range(N_CALLS):
            call()
        _sync()

    benchmark.group = group
    benchmark.pedantic(burst, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median, per_call = _time_calls(call)
    info["time_us"] = median * 1e6
    info["time_us_rounds"] = [round(t * 1e6, 2) for t in per_call]
    info["timing"] = (f"CUDA events around {N_CALLS} back-to-back calls, median of {ROUNDS} rounds" if CUDA
                      else f"host clock, {N_CALLS} call(s) per round, median of {ROUNDS} rounds")
    if CUDA:
        import triton.testing

        info["do_bench_us"] = triton.testing.do_bench(call, warmup=10, rep=50) * 1e3  # L2 flushed per call
    bound_s, dev = _device_bound()
    info["device"] = dev
    if info.get("timed_bytes") and not info.get("interpreted"):  # no speed figure for the interpreter
        info["GB/s"] = info["timed_bytes"] / median / 1e9
    if bound_s and info.get("bound_bytes"):
        info["pct_of_hbm_bound"] = 100 * (info["bound_bytes"] / bound_s) / median
        info["bound"] = (f"R*C*(2P+T) = {info['bound_bytes'] / 1e6:.1f} MB at {bound_s:.3g} B/s = "
                         f"{info['bound_bytes'] / bound_s * 1e6:.1f} us")
    elif info.get("bound_bytes"):
        info["bound"] = f"R*C*(2P+T) = {info['bound_bytes'] / 1e6:.1f} MB; no HBM figure for {dev}"
    _medians[(group, impl)] = median
    if impl == "triton" and CUDA:  # no ratio against the interpreter
        for other in ("eager", "compiled"):
            if (group, other) in _medians:
                info[f"speedup_vs_{other}"] = _medians[(group, other)] / median
    benchmark.extra_info.update(info)
    path = os.environ.get("IMG2VEC_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": case, **info}) + "\n")
    return median


def _bytes(b, c, layout, pred, target, ids):
    """(bound, layout) bytes of one forward + backward (see the module docstring)."""
    R = b * M
    P, T, I = pred.element_size(), target.element_size(), ids.element_size()
    bound = R * c * (2 * P + T)
    return bound, bound + R * (I + 4) + (b * N * c * P if layout == "BNC" else 0)


def _cases():
    """The issue's figures first (a run cut short by its time budget keeps them): the autograd
    call at every C, then the kernels alone, the (B, N, C) layout and a bf16 target."""
    def case(impl, c, layout="BMC", target="f32"):
        return pytest.param(impl, c, layout, target, id=f"fwd_bwd-C{c}-{layout}-{target}-{impl}")

    for c in CHANNELS:
        for impl in ("eager", "compiled", "triton"):
            yield case(impl, c)
    for c in CHANNELS:
        for impl in ("fwd_kernel", "bwd_kernel"):
            yield case(impl, c)
    if CUDA:
        for impl in ("eager", "triton", "fwd_kernel"):
            yield case(impl, CHANNELS[0], "BNC")
    # the teacher's bf16 channels_last map read in place (6 B/element)
    yield case("triton", CHANNELS[0], target="bf16cl")


@pytest.mark.parametrize("impl, c, layout, target_kind", list(_cases()))
def test_bench_masked_feature_loss(benchmark, impl, c, layout, target_kind):
    triton_impl = impl in ("triton", "fwd_kernel", "bwd_kernel")
    interpreted = triton_impl and not CUDA
    if triton_impl:
        if not TRITON_AVAILABLE:
            pytest.skip("triton is not importable: no Triton column")
        if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernel cannot run here")
    b = B_INTERPRETED if interpreted else B
    pred, target, ids = _inputs(b, c, layout, target_kind)
    numel = b * M * c
    bound, layout_bytes = _bytes(b, c, layout, pred, target, ids)
    info = {"shape": f"B={b} N={N} M={M} C={c} pred {layout} {PRED_DTYPE} target {target_kind} "
                     f"({tuple(target.stride())} strides)",
            "bound_bytes": bound, "layout_bytes": layout_bytes,
            "bytes_per_element": bound / numel}
    if interpreted:
        info.update(interpreted=True, note="interpreted, not a speed figure (TRITON_INTERPRET=1 on CPU, tiny batch)")

    # parity first (this also compiles / autotunes outside the timing)
    want = _fwd_bwd(masked_feature_loss_ref, pred, target, ids)()
    got = _fwd_bwd(masked_feature_loss, pred, target, ids)() if triton_impl else \
        _fwd_bwd(AUTOGRAD_IMPLS[impl], pred, target, ids)()
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1].float() * numel, want[1].float() * numel, rtol=0, atol=2.0 ** -7)
    _sync()

    case = f"fwd_bwd-C{c}-{layout}-{target_kind}-{impl}"  # the test id, as bench/summarize.py reads it
    # interpreted rows in a group of their own: their times are not to be ranked against eager ones
    group = f"fwd_bwd-C{c}-{layout}-{target_kind}" + (f"-interpreted-B{b}" if interpreted else "")
    if impl in AUTOGRAD_IMPLS:  # the op as users call it: forward + backward through autograd
        call = _fwd_bwd(AUTOGRAD_IMPLS[impl], pred, target, ids)
        info.update(what="autograd forward + backward", timed_bytes=bound,
                    bytes_formula="R*C*(2P+T)")
        if impl == "triton":
            info["op_bytes"] = layout_bytes
        peak_extra = None
        if CUDA:
            _sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            peak_extra = torch.cuda.max_memory_allocated() - base
            info["peak_extra_MB"] = peak_extra / 2 ** 20
        _record(benchmark, group, impl, call, info, case)
        return

    gather = layout == "BNC"
    if impl == "fwd_kernel":  # the forward kernel alone: buffers allocated once, outside the timing
        grid, args, cx, _, _ = mfl.fwd_launch_args(pred.detach(), target, ids, 2.0, 1e-6, "smooth_l1", True, gather)
        call = lambda: mfl._fwd[grid](*args, **cx)  # noqa: E731
        info.update(what="forward kernel alone (loss + stored gradient)", timed_bytes=layout_bytes -
                    (b * N * c * pred.element_size() if gather else 0), bytes_formula="R*C*(2P+T) + R*(I+4)")
        _record(benchmark, group, impl, call, info, case)
        return
    # the backward kernel alone, grad_out != 1 (the rescale pass); grad_out == 1 is an early exit
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=DEVICE)
    half, one = torch.full((), 0.5, device=DEVICE), torch.ones((), device=DEVICE)
    call = lambda: mfl._scale_launch(grad, half)  # noqa: E731
    info.update(what="backward kernel alone, grad_out = 0.5 (rescale in place)",
                timed_bytes=2 * grad.numel() * grad.element_size(), bytes_formula="2P per grad element",
                bound_bytes=None, bytes_per_element=2 * grad.element_size())
    if CUDA:
        info["grad_out_1_us"] = _time_calls(lambda: mfl._scale_launch(grad, one))[0] * 1e6
    _record(benchmark, group, impl, call, info, case)
