"""End-to-end training step: the reference configuration vs the optimized one, same device, same run.

    pytest bench/test_bench_train_step.py --benchmark-only [--benchmark-json=bench/results/X.json]

One step = teacher forward (frozen, no grad) -> random masking -> student forward -> masked
feature loss -> backward -> AdamW step, on a fixed synthetic batch already on the device (no
data loader: this measures the trainer, bench/test_bench_data.py the data path).

    reference  eager, attn_impl=math, loss_impl=reference, torch AdamW for-loop (foreach=False),
               the teacher's batch norms run (teacher_fold_bn=false)
    optimized  the teacher's batch norms folded into its convolutions, attn_impl=auto (sdpa),
               loss_impl=auto (the Triton kernel on CUDA; on CPU the reference: Triton there is
               only its numpy interpreter), fused_optim=auto (img2vec.optim.build_optimizer:
               apex FusedAdam, else torch fused AdamW on CUDA, foreach on CPU), torch.compile of
               student and teacher on CUDA for the models in IMG2VEC_BENCH_COMPILE (default
               vit_base; compiling L and H too does not fit the 8-minute device check). Not
               compiled on CPU: a cold compile of the student's forward+backward takes ~60 s on
               the 2-core machine (tests/test_attention.py).
    optimized_bf16_weights (ViT-B and the CPU's model only)  optimized, with the student's
               weights in bf16 and no autocast: what DeepSpeed's bf16 mode computes (train.py);
               autocast instead re-casts weights and runs layer norms in fp32 every step
    deepspeed_zero2 (ViT-B and the CPU's model only)  the step train.py runs: optimized inside
               the DeepSpeed engine of configs/ds_zero2.json (bf16 on CUDA with fp32 master
               weights, ZeRO-2 gradient buckets, clipping at 3.0; fp32 on CPU), the non-finite
               guard and img2vec.loop.backward_and_step; compiled with engine.compile() as
               train.py's `compile: true` does. Its time over optimized_bf16_weights' (CUDA) or
               optimized's (CPU, fp32), the same compute outside the engine, is what the engine
               costs in one process (bench/summarize.py: engine_time_vs_same_compute).

The other configurations are a plain torch AdamW step, not the DeepSpeed engine: on CUDA the
student runs under torch.autocast(bf16) with fp32 weights, or with bf16 weights
(optimized_bf16_weights); the teacher runs as in train.py (bf16 autocast, channels_last on
CUDA). fp32 throughout on CPU, but for the bf16-weights configuration.

Parity first: each configuration's loss and global gradient norm on a fixed batch, from the
same initial weights, must equal the reference's (fp32 CPU: rtol 1e-5 / 1e-4; bf16 CUDA: 2e-2
/ 5e-2) before anything is timed. The engine's gradient norm is the one it computes for
clipping, in its first step.

MFU = images/s * FLOPs per image / peak. FLOPs per image = 3 * (student forward FLOPs) +
(teacher forward FLOPs): the backward costs two forwards' matmuls, the teacher only runs
forward. Both forward counts are measured once with torch.utils.flop_counter.FlopCounterMode
(matmuls, convolutions, attention bmm; the math path, so every configuration is charged the
same work; elementwise ops are not counted). Peak: dense bf16 989e12 FLOP/s on H100 and H200.
On CPU there is no vendor figure: MFU is against a measured fp32 matmul rate on this machine
(1024^3 sgemm, best of 5), noisy when the machine is shared. Peak memory per configuration:
torch.cuda.max_memory_allocated over the timed steps (none on CPU).
"""
import contextlib
import gc
import os
import time
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` is first imported

from img2vec.loop import LogWindow, NonFiniteGuard, backward_and_step  # noqa: E402
from img2vec.optim import build_optimizer, param_groups  # noqa: E402
from img2vec.fastpaths import resolve_attn, resolve_loss  # noqa: E402
from img2vec.masking import random_masking  # noqa: E402
from img2vec.teacher import Teacher  # noqa: E402
from img2vec.vit import VIT_SIZES, build_student  # noqa: E402
from kernels.reference import masked_feature_loss_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16
# model -> micro-batch; CPU: the embedded smoke run's student (config.py defaults)
MODELS = {"vit_base": 256, "vit_large": 128, "vit_huge": 64} if CUDA else {"vit_tiny": 8}
IMAGE_SIZE = 224 if CUDA else 96
DECODER = (8, 512, 16) if CUDA else (2, 128, 4)  # depth, width, heads: MAE presets / smoke run
TEACHER = ("resnet50", 3)  # stride 16, C = 1024
MASK_RATIO = 0.75
ROUNDS = 10
COMPILE = set(filter(None, os.environ.get("IMG2VEC_BENCH_COMPILE", "vit_base" if CUDA else "").split(",")))
ENGINE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "ds_zero2.json")  # the main job's
TOL_BF16, TOL_FP32 = {"loss": 2e-2, "grad_norm": 5e-2}, {"loss": 1e-5, "grad_norm": 1e-4}

pytestmark = pytest.mark.usefixtures("bench_cpu_threads")  # bench/conftest.py


_shared = {}  # model -> weights, batch, FLOPs, the reference's parity figures
_medians = {}  # (model, config) -> seconds


def _patch_size(model):
    return VIT_SIZES[model].patch_size


def _build(model, attn):
    with torch.device(DEVICE):  # initialised on the device: ViT-H's 657M params init slowly on a CPU
        return build_student(model, IMAGE_SIZE, _patch_size(model), _shared[model]["channels"], *DECODER,
                             attn_impl=attn)


def _count_flops(model):
    """Forward FLOPs per image of student (math attention) and teacher, on the meta device."""
    p, B = _patch_size(model), 2
    with torch.device("meta"):
        teacher = Teacher(*TEACHER, "random", p, IMAGE_SIZE)
        student = build_student(model, IMAGE_SIZE, p, teacher.channels, *DECODER, attn_impl="math")
    images = torch.empty(B, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    mask = random_masking(B, (IMAGE_SIZE // p) ** 2, MASK_RATIO, device="meta")
    with FlopCounterMode(display=False) as student_fc:
        student(images, mask.ids_keep, mask.ids_restore, mask.ids_masked)
    with FlopCounterMode(display=False) as teacher_fc:
        teacher(images)
    return student_fc.get_total_flops() / B, teacher_fc.get_total_flops() / B


def _setup(model):
    if model in _shared:
        return _shared[model]
    B, p = MODELS[model], _patch_size(model)
    teacher = Teacher(*TEACHER, "random", p, IMAGE_SIZE, seed=0).to(DEVICE)  # batch norms folded
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(DEVICE)  # (B, 3, H, W)
    n = (IMAGE_SIZE // p) ** 2
    _shared[model] = s = {"teacher": teacher, "channels": teacher.channels, "images": images, "N": n,
                          "mask": random_masking(B, n, MASK_RATIO, generator=g, device=DEVICE)}
    torch.manual_seed(0)
    s["weights"] = {k: v.detach().clone() for k, v in _build(model, "math").state_dict().items()}
    s["student_flops"], s["teacher_flops"] = _count_flops(model)
    s["teacher_s"] = _time_teacher(teacher, images)
    return s


def _time_teacher(teacher, images):
    """Median of 3 eager forwards: the teacher's share of a step, to read the student part of a ratio."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        teacher(images)
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def _autocast(student):
    bf16_weights = next(student.parameters()).dtype == torch.bfloat16
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA and not bf16_weights else contextlib.nullcontext()


def _configure(model, config):
    """(student, teacher_fn, loss_fn, optimizer, description) for one configuration."""
    s = _setup(model)
    if config == "reference":
        attn, (loss_name, loss_fn), compiled = "math", ("reference", masked_feature_loss_ref), False
    else:
        attn, (loss_name, loss_fn) = resolve_attn("auto", DEVICE), resolve_loss("auto", DEVICE)
        compiled = CUDA and model in COMPILE
    student = _build(model, attn)
    student.load_state_dict(s["weights"])
    if config == "optimized_bf16_weights":
        student.to(torch.bfloat16)
    engine = None
    if config == "reference":
        optimizer = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95), foreach=False)
        optim_name = "torch AdamW (for-loop)"
    else:
        optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), "auto")
        optim_name = type(optimizer).__name__ + (" fused" if optimizer.defaults.get("fused") else "")
    if config == "deepspeed_zero2":
        engine = _engine(student, optimizer, MODELS[model])
        optim_name = f"DeepSpeed ZeRO-{engine.zero_optimization_stage()} around {optim_name}"
    teacher_fn = s["teacher"]
    if config == "reference":  # the teacher as timm builds it: its batch norms run
        if "teacher_unfolded" not in s:
            s["teacher_unfolded"] = Teacher(*TEACHER, "random", _patch_size(model), IMAGE_SIZE, seed=0,
                                            fold_bn=False).to(DEVICE)
            s["teacher_unfolded_s"] = _time_teacher(s["teacher_unfolded"], s["images"])
        teacher_fn = s["teacher_unfolded"]
    if compiled and engine is not None:  # as train.py: after initialize, DeepSpeed's hooks stay outside
        engine.compile()
        student, teacher_fn = engine, torch.compile(s["teacher"])
    elif compiled:
        student, teacher_fn = torch.compile(student), torch.compile(s["teacher"])
    elif engine is not None:
        student = engine
    why = ("" if loss_name == "triton" or config == "reference"
           else "reference loss: on CPU Triton runs only in its numpy interpreter, no speed figure")
    precision = "bf16 autocast (fp32 weights)" if CUDA else "fp32"
    if config == "optimized_bf16_weights":
        precision = "bf16 weights, no autocast (DeepSpeed bf16 mode's compute)"
    if engine is not None:
        precision = f"DeepSpeed {'bf16 (bf16 weights, fp32 master weights)' if CUDA else 'fp32'}"
    desc = {"attn": attn, "loss": loss_name, "compiled": compiled, "optimizer": optim_name, "precision": precision}
    if why:
        desc["note"] = why
    if not compiled and config != "reference":
        desc["compile_off_because"] = ("CPU: cold compile ~60 s on 2 cores" if not CUDA
                                       else "not in IMG2VEC_BENCH_COMPILE (device-check time budget)")
    return student, teacher_fn, loss_fn, optimizer, desc


def _engine(student, optimizer, micro_batch):
    """The DeepSpeed engine of the main job's JSON around `student`, in a one-process group."""
    from img2vec.distributed import init_distributed
    from img2vec.ds_config import load_ds_config
    from img2vec.runtime import build_engine

    if not torch.distributed.is_initialized():
        init_distributed()
    ds_config = load_ds_config(ENGINE_CONFIG, 1)
    ds_config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                     train_batch_size=micro_batch)
    return build_engine(student, optimizer, types.SimpleNamespace(ds_config=ds_config))[0]


def _is_engine(student):
    return hasattr(student, "zero_optimization_stage")


def _loss(student, teacher_fn, loss_fn, images, mask):
    target = teacher_fn(images)  # (B, N, C) fp32, no grad
    with _autocast(student):
        images = images.to(next(student.parameters()).dtype)  # bf16 weights take bf16 images, as train.py's engine
        pred = student(images, mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
    return loss_fn(pred, target, mask.ids_masked, 2.0, 1e-6)


def _parity(model, config, student, teacher_fn, loss_fn):
    """Loss and gradient norm on the fixed batch; the reference's are the contract."""
    s = _shared[model]
    loss = _loss(student, teacher_fn, loss_fn, s["images"], s["mask"])
    if _is_engine(student):  # ZeRO keeps the gradients in its own buffers: read the norm it clips by
        student.backward(loss)
        student.step()
        grad_norm = float(student.get_global_grad_norm())
    else:
        loss.backward()
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in student.parameters() if p.grad is not None])).item()
        student.zero_grad(set_to_none=True)
    got = {"loss": loss.item(), "grad_norm": grad_norm}
    if config == "reference":
        s["parity"] = got
    want = s["parity"]
    tol = TOL_BF16 if CUDA or config == "optimized_bf16_weights" else TOL_FP32
    for key in ("loss", "grad_norm"):
        assert abs(got[key] - want[key]) <= tol[key] * abs(want[key]), (
            f"{model} {config}: {key} {got[key]:.6g} vs reference {want[key]:.6g}")
    return got


def _cpu_matmul_peak():
    a = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


BF16_MODELS = ("vit_base", "vit_tiny")  # bf16 weights and the engine; L and H: not within the device check's time


@pytest.mark.parametrize("model, config", [(m, c) for m in MODELS for c in ("reference", "optimized")]
                         + [(m, c) for m in MODELS if m in BF16_MODELS
                            for c in ("optimized_bf16_weights", "deepspeed_zero2")])
def test_bench_train_step(benchmark, config, model):
    s = _setup(model)
    if config != "reference" and "parity" not in s:  # the reference sets the parity contract
        _parity(model, "reference", *_configure(model, "reference")[:3])
    student, teacher_fn, loss_fn, optimizer, desc = _configure(model, config)
    B, N = MODELS[model], s["N"]
    t0 = time.perf_counter()
    parity = _parity(model, config, student, teacher_fn, loss_fn)  # also compiles / warms up
    warmup_s = time.perf_counter() - t0
    live = {"student": student, "teacher": teacher_fn, "optimizer": optimizer}  # cleared after timing
    if _is_engine(student):  # train.py's per-step bookkeeping, device ops only
        live["guard"] = NonFiniteGuard(optimizer, DEVICE, 1, max_in_a_row=10)
        live["window"] = LogWindow(DEVICE, 10**9, 10**9, B, 1, 1)
    del student, teacher_fn, optimizer
    g = torch.Generator().manual_seed(1)

    def step():
        # masks drawn on CPU and moved, as train.py does (mask_noise -> random_masking)
        mask = random_masking(B, N, MASK_RATIO, generator=g, device=DEVICE)
        loss = _loss(live["student"], live["teacher"], loss_fn, s["images"], mask)
        if "guard" in live:
            backward_and_step(live["student"], live["guard"], live["window"], loss, boundary=True)
            live["guard"].end_step()
        else:
            loss.backward()
            live["optimizer"].step()
            live["optimizer"].zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    step()  # the optimizer's state is allocated on its first step
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"train-step-{model}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    if _is_engine(live["student"]):
        live["student"].destroy()  # its optimizer's flat buffers and hooks
    live.clear()
    if desc["compiled"]:
        torch._dynamo.reset()  # drop the compiled graphs, which hold the student
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    if benchmark.stats is None:  # --benchmark-disable: the parity check was the test
        return
    median = benchmark.stats.stats.median
    _medians[model, config] = median
    flops_per_image = 3 * s["student_flops"] + s["teacher_flops"]
    name = torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)"
    info = {
        "device": name, "model": model, "image_size": IMAGE_SIZE, "micro_batch": B,
        "decoder": "x".join(map(str, DECODER)), "teacher": f"{TEACHER[0]} stage {TEACHER[1]}",
        **desc, "images_per_s": B / median, "step_ms_median": 1e3 * median,
        "warmup_and_parity_s": warmup_s, "parity_loss": parity["loss"], "parity_grad_norm": parity["grad_norm"],
        "flops_per_image": flops_per_image,
        "flops_formula": "3 * student_fwd + teacher_fwd (FlopCounterMode, math attention)",
        "student_fwd_gflops": s["student_flops"] / 1e9, "teacher_fwd_gflops": s["teacher_flops"] / 1e9,
        "teacher_share_of_flops": s["teacher_flops"] / flops_per_image,
    }
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak:
        info["mfu_pct"] = 100 * flops_per_image * B / median / peak
    elif not CUDA:
        measured = _cpu_matmul_peak()
        info["cpu_sgemm_flops_measured"] = measured
        info["mfu_vs_measured_sgemm_pct"] = 100 * flops_per_image * B / median / measured
    if peak_mem is not None:
        info["peak_memory_GiB"] = peak_mem
    info["teacher_fwd_ms_eager"] = 1e3 * s["teacher_s"]
    if config != "reference" and (model, "reference") in _medians:
        ref = _medians[model, "reference"]
        info["speedup_vs_reference"] = ref / median
        if not CUDA:  # both teachers eager: the ratio of what is left is the student's
            info["student_part_speedup"] = (ref - s["teacher_unfolded_s"]) / max(median - s["teacher_s"], 1e-9)
    benchmark.extra_info.update(info)
