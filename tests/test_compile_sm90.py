"""Ahead-of-time sm_90 (H100) compile of every kernel variant the fused loss's launcher can
pick, with the real Triton compiler and the ptxas inside the triton wheel. No GPU needed.

Each variant is built from the launcher's own arguments (`fwd_launch_args` on meta tensors
of the trainer's shapes, GPU choices) for each autotune config, specialized the way Triton's
runtime specializes them (pointer and integer divisibility by 16, integers equal to 1), then
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`.
Checked per variant, from the cubin (cuobjdump --dump-resource-usage) and the PTX:
  * no local memory (register spills) and no stack at the realistic widths;
  * registers x threads fit at least two blocks per SM (65536 registers);
  * 128-bit global loads and stores (pred, and target when its channel stride is 1);
  * no atomics (the reduction is deterministic).

Variants (the parametrize ids list them), both pred layouts each: bf16 pred x bf16 or fp32
target, fp32 x fp32, "mse" on bf16 x bf16, all with grad; without grad (no_grad / eval); a strided target
(channel stride != 1); the backward's rescale per dtype. Widths 384 (ViT-S), 768, 1024,
1280, 2048 give one binary (same chunk, same specialization): each id names the
widths it covers. Compiles run in two spawned processes (TRITON_INTERPRET=0 there) with a
fresh Triton cache, so nothing is reused from an earlier run.
"""
import concurrent.futures
import importlib
import multiprocessing
import os
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

mfl = importlib.import_module("kernels.masked_feature_loss")


def _nvidia_backend_reason():
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton has no ahead-of-time compile API ({e})"
    if "nvidia" not in backends:
        return f"the installed triton has no NVIDIA backend (backends: {sorted(backends)})"
    return None


SKIP_REASON = _nvidia_backend_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

B, N, M = 256, 196, 147  # the trainer's shapes: 224 px / 16, 75% masked
WIDTHS = (384, 768, 1024, 1280, 2048)
REGS_PER_SM = 65536
bf16, f32 = torch.bfloat16, torch.float32
DT = {bf16: "bf16", f32: "f32"}


def _specialize(arg):
    """(type, attr) as Triton's runtime specializes an argument (both 3.6 and 3.8)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, arg, False, True, True)


def _source(fn, args, constexprs):
    """(signature, constexprs, attrs) of fn called with args (positional) and constexprs."""
    from triton.backends.compiler import BaseBackend

    sig, consts, attrs = {}, {}, {}
    it = iter(args)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[name] = "constexpr", constexprs[name]
            continue
        ty, attr = _specialize(next(it))
        if ty == "constexpr":  # an integer equal to 1
            sig[name], consts[name] = "constexpr", attr
            continue
        sig[name] = ty
        if attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return sig, consts, attrs


def _fwd_specs(pdt, tdt, gather, kind, write_grad, C, strided_target=False):
    """One (compile spec) per autotune config, from the launcher's own arguments."""
    pred = torch.empty(B, N if gather else M, C, dtype=pdt, device="meta")
    if strided_target:  # a contiguous (B, C, h, w) map viewed as (B, N, C): channel stride N
        target = torch.empty(B, C, N, dtype=tdt, device="meta").transpose(1, 2)
    else:  # channels_last (B, C, h, w) viewed as (B, N, C), or a contiguous (B, N, C)
        target = torch.empty(B, N, C, dtype=tdt, device="meta")
    ids = torch.empty(B, M, dtype=torch.int64, device="meta")
    _, args, constexprs, _, _ = mfl.fwd_launch_args(pred, target, ids, 2.0, 1e-6, kind, write_grad, gather,
                                                    interpret=False)
    for block_m, warps in mfl.FWD_CONFIGS:
        cx = dict(constexprs, BLOCK_M=block_m)
        sig, consts, attrs = _source(mfl._fwd_kernel, args, cx)
        yield {"kernel": "_fwd_kernel", "signature": sig, "constexprs": consts, "attrs": attrs,
               "num_warps": warps, "vector_target": not strided_target}


def _scale_specs(pdt):
    grad = torch.empty(B, M, 1024, dtype=pdt, device="meta")
    _, args, constexprs, warps = mfl.scale_launch_args(grad, torch.ones((), device="meta"))
    sig, consts, attrs = _source(mfl._scale_kernel, args, constexprs)
    yield {"kernel": "_scale_kernel", "signature": sig, "constexprs": consts, "attrs": attrs,
           "num_warps": warps, "vector_target": True}


def _variants():
    """{id: spec}; ids name the widths that share one binary."""
    out = {}

    def add(label, specs_by_width):
        by_key = {}
        for width, specs in specs_by_width:
            for spec in specs:
                key = repr((spec["kernel"], sorted(spec["signature"].items()), sorted(spec["constexprs"].items()),
                            sorted(spec["attrs"].items()), spec["num_warps"]))
                by_key.setdefault(key, (spec, []))[1].append(width)
        for spec, widths in by_key.values():
            cx = spec["constexprs"]
            tile = f"BM{cx['BLOCK_M']}xBC{cx['BLOCK_C']}" if "BLOCK_M" in cx else f"B{cx['BLOCK']}"
            out[f"{label}-{tile}-w{spec['num_warps']}-C{'/'.join(map(str, widths))}"] = spec

    # the trainer's dtypes (bf16 pred; bf16 channels_last or fp32 teacher features) and fp32
    # throughout; "mse" differs from "smooth_l1" in two elementwise lines: one dtype pair
    for pdt, tdt, kind in ((bf16, bf16, "smooth_l1"), (bf16, f32, "smooth_l1"), (f32, f32, "smooth_l1"),
                           (bf16, bf16, "mse")):
        for gather in (False, True):
            add(f"fwd-{'BNC' if gather else 'BMC'}-{DT[pdt]}x{DT[tdt]}-{kind}",
                [(c, _fwd_specs(pdt, tdt, gather, kind, True, c)) for c in WIDTHS])
    add("fwd-BMC-bf16xbf16-smooth_l1-nograd", [(c, _fwd_specs(bf16, bf16, False, "smooth_l1", False, c))
                                               for c in WIDTHS])
    add("fwd-BMC-bf16xbf16strided-smooth_l1", [(c, _fwd_specs(bf16, bf16, False, "smooth_l1", True, c, True))
                                               for c in WIDTHS])
    for pdt in (bf16, f32):
        add(f"scale-{DT[pdt]}", [("any", _scale_specs(pdt))])
    return out


VARIANTS = _variants() if SKIP_REASON is None else {}


def _compile_one(spec):
    """In a worker process: compile for sm_90, return resource usage and PTX facts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(mfl, spec["kernel"])
    assert type(fn).__name__ == "JITFunction", f"worker got {type(fn).__name__}: TRITON_INTERPRET must be 0 here"
    src = ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"])
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(tok.split(":", 1) for tok in usage.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
    ptx = k.asm["ptx"]
    return {"regs": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"]),
            "shared": int(fields["SHARED"]), "ld_v4": ptx.count("ld.global.v4"),
            "st_v4": ptx.count("st.global.v4"), "atomics": ptx.count("atom.")}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{id: result dict or error string}: every variant, compiled once in two processes."""
    env = {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    # spawned workers inherit it: compilable JITFunctions (this process may be interpreting:
    # its triton.language is patched for the interpreter), and a fresh cache
    os.environ.update(env)
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = {name: pool.submit(_compile_one, spec) for name, spec in VARIANTS.items()}
            results = {}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result(timeout=300)
                except Exception as e:  # noqa: BLE001 - reported by the variant's own test
                    results[name] = f"{type(e).__name__}: {str(e)[-2000:]}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for name, r in results.items():
        print(f"sm_90 {name}: {r}")
    return results


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90_without_spills(compiled, name):
    r = compiled[name]
    assert isinstance(r, dict), f"{name} does not compile for sm_90: {r}"
    assert r["local"] == 0 and r["stack"] == 0, f"{name} spills to local memory: {r}"
    threads = 32 * VARIANTS[name]["num_warps"]
    assert 2 * r["regs"] * threads <= REGS_PER_SM, f"{name}: {r['regs']} regs x {threads} threads fit one block/SM"
    assert r["ld_v4"] > 0, f"{name}: no 128-bit global loads: {r}"
    writes_grad = VARIANTS[name]["constexprs"].get("WRITE_GRAD", True)
    assert r["st_v4"] > 0 or not writes_grad, f"{name}: no 128-bit global stores: {r}"
    assert r["atomics"] == 0, f"{name} uses atomics: {r}"


def test_variant_list_covers_every_autotune_config_and_width():
    """The list above is what the launcher picks: every config, and each realistic width."""
    fwd = [n for n in VARIANTS if n.startswith("fwd-BMC-bf16xf32-smooth_l1-")]
    assert len(fwd) == len(mfl.FWD_CONFIGS), fwd
    assert all("C384/768/1024/1280/2048" in n for n in fwd), fwd
    print(f"{len(VARIANTS)} sm_90 variants:", *VARIANTS, sep="\n  ")
