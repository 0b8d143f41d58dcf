"""Largest micro-batch that trains on one device: DeepSpeed ZeRO-3, bf16, grad ckpt on every block.

    python bench/max_micro_batch.py [--model vit_huge] [--budget-s 150] [--json OUT.json]
    python bench/max_micro_batch.py --dry-run      # CPU: vit_tiny at 64 px, gloo, RSS for memory

The search starts from img2vec.memory's estimate of the largest micro-batch for the device's
memory, then steps up (x1.25) while probes fit and down (x0.8) while they do not, and bisects
the bracket while the time budget lasts. Each probe is a fresh process (an out-of-memory error
leaves DeepSpeed's ZeRO-3 hooks in no state to go on): it builds the engine as train.py does
(configs/ds_zero3.json with the probed micro-batch, a torch AdamW, teacher outside the engine,
the loss train.py picks: loss_impl=auto, the Triton kernel on CUDA), runs 3 steps on a synthetic
batch, and reports torch.cuda.max_memory_allocated over them (on CPU: the VmHWM rise of the
process, a coarser figure) and images/s of the last 2 steps, next to the estimator's total for
the same micro-batch.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def probe(args) -> dict:
    """One process, one micro-batch: 3 training steps; never raises on out-of-memory."""
    import deepspeed
    import torch

    from img2vec.distributed import init_distributed
    from img2vec.ds_config import load_ds_config
    from img2vec.fastpaths import resolve_loss
    from img2vec.optim import build_optimizer
    from img2vec.masking import random_masking
    from img2vec.teacher import Teacher
    from img2vec.vit import VIT_SIZES, build_student

    cuda = torch.cuda.is_available()
    _, world, _ = init_distributed()
    device = torch.device("cuda" if cuda else "cpu")
    loss_name, loss_fn = resolve_loss("auto", device, "smooth_l1")
    B, p, depth = args.probe, VIT_SIZES[args.model].patch_size, VIT_SIZES[args.model].depth
    ds_config = load_ds_config(os.path.join(ROOT, "configs/ds_zero3.json"), world)
    ds_config["train_micro_batch_size_per_gpu"] = B
    ds_config["train_batch_size"] = B * ds_config["gradient_accumulation_steps"] * world
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    teacher = Teacher("resnet50", 3, "random", p, args.image_size).to(device)
    with torch.device(device):  # initialised on the device: 657M params init slowly on a CPU
        student = build_student(args.model, args.image_size, p, teacher.channels, *args.decoder,
                                attn_impl="sdpa", grad_ckpt=depth)
    optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.95), "auto")
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    n = (args.image_size // p) ** 2
    images = torch.randn(B, 3, args.image_size, args.image_size, device=device)  # (B, 3, H, W)

    def rss_hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")
        base = rss_hwm()
    times = []
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            target = teacher(images)  # (B, N, C) fp32
            mask = random_masking(B, n, 0.75, device=device)
            pred = engine(images.to(dtype), mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
            loss = loss_fn(pred, target, mask.ids_masked, 2.0, 1e-6)
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        return {"micro_batch": B, "ok": False, "error": str(e).splitlines()[0][:200]}
    out = {"micro_batch": B, "ok": True, "loss": float(loss), "loss_impl": loss_name,
           "images_per_s": 2 * B / sum(times[1:])}
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_over_start_bytes"] = out["peak_bytes"] - base
        out["device_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        out["peak_bytes"] = rss_hwm() - base  # the process's RSS rise: activations + states created here
    return out


def run_probe(args, B: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", str(B), "--model", args.model,
           "--image-size", str(args.image_size), "--decoder", *map(str, args.decoder)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)  # a fresh one-process group per probe
    env["MASTER_PORT"] = str(29600 + B % 300)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.probe_timeout_s)
    line = next((l for l in r.stdout.splitlines() if l.startswith("PROBE ")), None)
    out = json.loads(line[6:]) if line else {
        "micro_batch": B, "ok": False, "error": f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or [""])[-1][:300]}
    out["probe_s"] = round(time.perf_counter() - t0, 1)
    if out["ok"] and args.fake_limit_mib and out["peak_bytes"] > args.fake_limit_mib * 2**20:
        out.update(ok=False, error=f"simulated out of memory: peak {out['peak_bytes'] / 2**20:.0f} MiB over "
                                   f"--fake-limit-mib {args.fake_limit_mib:g}")
    print(f"  micro-batch {B:5d}: {'fits' if out['ok'] else 'FAILS'}"
          + (f", peak {out['peak_bytes'] / 2**30:.2f} GiB, {out['images_per_s']:.1f} img/s" if out["ok"] else
             f" ({out['error']})") + f"  [{out['probe_s']} s]", flush=True)
    return out


def search(args) -> dict:
    import torch

    from img2vec import memory

    s = memory.model_shapes(args.model, args.image_size, 0, 0.75, *args.decoder)
    cuda = torch.cuda.is_available()
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else memory.H100_BYTES
    kw = dict(zero=3, gpus=1, grad_ckpt=s.depth)
    estimated = memory.max_micro_batch(s, device_bytes, **kw)
    guess = args.start or max(1, estimated)
    print(f"{args.model}: estimator's largest micro-batch for {device_bytes / 2**30:.1f} GiB "
          f"(ZeRO-3, 1 GPU, grad ckpt {s.depth}/{s.depth}): {estimated}; first probe {guess}", flush=True)
    t_end = time.perf_counter() + args.budget_s
    probes, fit, fail = [], 0, None
    b = guess
    while time.perf_counter() < t_end and b >= 1:
        r = run_probe(args, b)
        r["estimated_bytes"] = memory.estimate(s, micro_batch=b, precision="bf16" if cuda else "fp32", **kw).total
        probes.append(r)
        if r["ok"]:
            fit = max(fit, b)
        else:
            fail = b if fail is None else min(fail, b)
            if "error" in r and "out of memory" not in r["error"].lower() and "OutOfMemory" not in r["error"]:
                break  # not a memory failure: searching further would not help
        if fail is None:
            b = int(b * 1.25) + 1
        elif fit == 0:
            b = int(b * 0.8)
        elif fail - fit > max(1, fit // 32):  # bisect to ~3%
            b = (fit + fail) // 2
        else:
            break
    best = next((p for p in probes if p["ok"] and p["micro_batch"] == fit), None)
    return {"model": args.model, "image_size": args.image_size, "decoder": args.decoder,
            "estimated_max_micro_batch": estimated, "first_probe": guess,
            "max_micro_batch_found": fit, "first_failing": fail,
            "peak_bytes_at_max": best and best["peak_bytes"], "device_bytes": device_bytes,
            "estimated_bytes_at_max": best and best["estimated_bytes"],
            "images_per_s_at_max": best and best["images_per_s"], "probes": probes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_huge")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--decoder", type=int, nargs=3, default=[8, 512, 16], metavar=("DEPTH", "WIDTH", "HEADS"))
    ap.add_argument("--start", type=int, default=0, help="first micro-batch to probe (0: the estimator's)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting probes after this")
    ap.add_argument("--probe-timeout-s", type=float, default=180.0)
    ap.add_argument("--json", default="", help="write the result here")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU logic check: vit_tiny at 64 px from micro-batch 4, a simulated 150 MiB device")
    ap.add_argument("--fake-limit-mib", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print("PROBE " + json.dumps(probe(args)), flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip process-group and engine teardown: the result is out, nothing else to keep
    if args.dry_run:
        args.model, args.image_size, args.decoder = "vit_tiny", 64, [1, 64, 2]
        args.start, args.budget_s = args.start or 4, min(args.budget_s, 90.0)
        args.fake_limit_mib = args.fake_limit_mib or 150.0  # probes that peak above it count as OOM
    result = search(args)
    print(f"max micro-batch {result['max_micro_batch_found']} (first failing: {result['first_failing']}), "
          f"estimator said {result['estimated_max_micro_batch']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
