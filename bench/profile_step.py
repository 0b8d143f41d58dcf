"""Where one training step's time goes: phase timings and the top kernels of the optimized step.

    python bench/profile_step.py [--model vit_base] [--steps 3] [--json OUT.json]

The step is bench/test_bench_train_step.py's optimized configuration (same model, micro-batch,
teacher, decoder and synthetic batch), eager: torch.compile fuses kernels under generated names
that no longer say which layer they came from. Two measurements after `--warmup` steps:

    phases   device time between marks placed in the step (CUDA events; perf_counter on CPU):
             teacher fwd | encoder fwd | decoder fwd | loss fwd | loss + decoder bwd
             | encoder bwd (a hook on the latent's gradient splits the backward) | optimizer
    kernels  torch.profiler over `--steps` steps: the top 15 device kernels by total time, and
             every kernel put in a class by its name (conv = the teacher, gemm = the linears,
             attention, the loss kernel, optimizer, other elementwise/norm), plus the share of the
             step's wall time in which the device ran no kernel (host gaps).

No data loader (bench/test_bench_data.py measures the data path): data is 0% here by design.
"""
import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_bench_train_step as tb  # noqa: E402  (sets TRITON_INTERPRET on CPU before kernels load)
from img2vec.masking import random_masking  # noqa: E402

KERNEL_CLASSES = [  # first match wins; names of cuDNN / cuBLAS / Triton / torch kernels
    ("loss", r"masked_feature|smooth_l1"),
    ("optimizer", r"adam|multi_tensor"),
    ("attention", r"flash|fmha|sdpa|attention|softmax"),
    ("conv (teacher, patch embed)", r"conv|fprop|dgrad|wgrad|cudnn"),
    ("gemm (linears)", r"gemm|nvjet|cutlass|sm\d+_xmma|matmul|addmm|linear"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((label for label, pattern in KERNEL_CLASSES if re.search(pattern, low)), "other (elementwise, norm)")


class Marks:
    """Named points on the device timeline; intervals between consecutive marks."""

    def __init__(self):
        self.points = []

    def mark(self, name):
        if tb.CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def intervals_ms(self):
        if tb.CUDA:
            torch.cuda.synchronize()
            gap = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            gap = lambda a, b: 1e3 * (b - a)  # noqa: E731
        return {name: gap(t0, t1) for (_, t0), (name, t1) in zip(self.points, self.points[1:])}


def step(student, teacher_fn, loss_fn, optimizer, images, mask, marks):
    marks.mark("start")
    target = teacher_fn(images)  # (B, N, C)
    marks.mark("teacher fwd")
    with tb._autocast(student):
        images = images.to(next(student.parameters()).dtype)
        latent = student.encoder(images, mask.ids_keep)  # (B, 1 + V, D)
        marks.mark("encoder fwd")
        latent.register_hook(lambda grad: marks.mark("loss + decoder bwd"))
        pred = student.decoder(latent, mask.ids_restore, mask.ids_masked)  # (B, M, C)
        marks.mark("decoder fwd")
    loss = loss_fn(pred, target, mask.ids_masked, 2.0, 1e-6)
    marks.mark("loss fwd")
    loss.backward()
    marks.mark("encoder bwd")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    marks.mark("optimizer")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_base" if tb.CUDA else "vit_tiny", choices=list(tb.MODELS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", default="optimized", choices=["optimized", "optimized_bf16_weights"],
                        help="bench/test_bench_train_step.py's configuration")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    tb.COMPILE = set()  # eager: kernel names that say where they come from
    s = tb._setup(args.model)
    student, teacher_fn, loss_fn, optimizer, desc = tb._configure(args.model, args.config)
    B, N = tb.MODELS[args.model], s["N"]
    g = torch.Generator().manual_seed(1)
    masks = [random_masking(B, N, tb.MASK_RATIO, generator=g, device=tb.DEVICE)
             for _ in range(args.warmup + 2 * args.steps)]
    run = lambda mask, marks: step(student, teacher_fn, loss_fn, optimizer, s["images"], mask, marks)  # noqa: E731
    for mask in masks[:args.warmup]:
        run(mask, Marks())

    phases = {}
    for mask in masks[args.warmup:args.warmup + args.steps]:
        marks = Marks()
        run(mask, marks)
        for name, ms in marks.intervals_ms().items():
            phases[name] = phases.get(name, 0.0) + ms / args.steps
    step_ms = sum(phases.values())

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if tb.CUDA else [])
    if tb.CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for mask in masks[args.warmup + args.steps:]:
            run(mask, Marks())
        if tb.CUDA:
            torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / args.steps

    sort_by = "cuda_time_total" if tb.CUDA else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))  # torch's own view, beside ours
    kernels = {}  # name -> device ms per step: kernels on CUDA, top-level ops on CPU
    for e in prof.events():
        is_kernel = (e.device_type == torch.autograd.DeviceType.CUDA) if tb.CUDA else (e.cpu_parent is None)
        if is_kernel:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / args.steps
    busy_ms = sum(kernels.values())
    classes = {}
    for name, ms in kernels.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]

    print(f"{args.model} {args.config}, micro-batch {B}, {desc['attn']} attention, {desc['loss']} loss, {desc['optimizer']}, "
          f"{desc['precision']}, eager; {tb.DEVICE}")
    print(f"\nphases (device time, mean of {args.steps} steps): {step_ms:.1f} ms/step, {B / step_ms * 1e3:.0f} img/s")
    for name, ms in phases.items():
        print(f"  {name:<22} {ms:8.2f} ms  {100 * ms / step_ms:5.1f}%")
    print(f"\nkernels under the profiler: wall {wall_ms:.1f} ms/step, kernels {busy_ms:.1f} ms/step, "
          f"device idle {100 * max(wall_ms - busy_ms, 0) / wall_ms:.1f}% (host gaps)")
    for label, ms in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<30} {ms:8.2f} ms  {100 * ms / busy_ms:5.1f}%")
    print("\ntop 15 kernels (ms per step, % of kernel time, class):")
    for name, ms in top:
        print(f"  {ms:8.2f}  {100 * ms / busy_ms:5.1f}%  {kernel_class(name):<28} {name[:110]}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "config_name": args.config, "micro_batch": B, "config": desc, "device": str(tb.DEVICE),
                       "step_ms_phases": step_ms, "phases_ms": phases, "profiled_wall_ms_per_step": wall_ms,
                       "kernel_ms_per_step": busy_ms, "kernel_classes_ms": classes,
                       "top_kernels_ms": [{"name": n, "ms": ms, "class": kernel_class(n)} for n, ms in top]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
