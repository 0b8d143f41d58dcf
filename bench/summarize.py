"""Summary of a device check (bench/device_check.sh): one JSON with the GPU figures.

    python bench/summarize.py WORK_DIR OUT.json

Reads what the steps left in WORK_DIR (any of it may be missing: a step that was killed or
never ran): versions.json, steps.jsonl (one line per finished step), loss.jsonl (one line per
finished fused-loss case), pytest-benchmark JSONs, max_micro_batch.json, *.log.
Writes OUT.json and prints a short table. It never fails on a missing file or key: what it
cannot read is listed under "errors" and the figure is null. No torch import (fast, and it
runs where torch is broken too).
"""
import glob
import json
import os
import re
import sys


def _load_json(path, errors):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        errors.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}")
        return None


def _load_jsonl(path, errors):
    rows = []
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    errors.append(f"{os.path.basename(path)} line {i + 1}: not JSON (cut short?)")
    except FileNotFoundError:
        pass
    except OSError as e:
        errors.append(f"{os.path.basename(path)}: {e}")
    return rows


def _num(x, nd=2):
    return round(x, nd) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _scalars(d):
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}


def _benchmarks(work, errors):
    """{pytest-benchmark name: extra_info scalars + median_s}, from every pytest-benchmark JSON."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(work, "*.json"))):
        not_benchmarks = ("versions.json", "max_micro_batch.json", "profile.json")
        if os.path.basename(path) in not_benchmarks or os.path.getsize(path) == 0:
            continue  # not a benchmark, or a step killed before pytest-benchmark wrote it
        data = _load_json(path, errors)
        if not isinstance(data, dict):
            continue
        for b in data.get("benchmarks") or []:
            if not isinstance(b, dict) or "name" not in b:
                continue
            row = _scalars(b.get("extra_info"))
            row["median_s"] = (b.get("stats") or {}).get("median")
            rows[b["name"]] = row
    return rows


def fused_loss(work, benches, errors):
    """The issue's loss rows: per C, fwd+bwd % of the 8 B/element bound, x eager, x compiled."""
    rows = {r.get("name"): r for r in _load_jsonl(os.path.join(work, "loss.jsonl"), errors) if isinstance(r, dict)}
    for name, b in benches.items():  # the final JSON, where the JSONL is missing
        m = re.match(r"test_bench_masked_feature_loss\[(.*)\]$", name)
        if m and m.group(1) not in rows:
            rows[m.group(1)] = b
    out = {}
    for name, r in sorted(rows.items()):
        if not name:
            continue
        out[name] = {k: _num(r.get(k)) if k != "bound" else r.get(k) for k in (
            "time_us", "do_bench_us", "GB/s", "pct_of_hbm_bound", "speedup_vs_eager", "speedup_vs_compiled",
            "bytes_per_element", "peak_extra_MB", "grad_out_1_us", "bound")}
        out[name]["note"] = r.get("note")
    return out


def train_step(benches):
    """Per model-configuration row; the DeepSpeed engine's row also gets its step time over the same
    compute outside the engine (bf16 weights on CUDA, fp32 on CPU), from whichever JSON holds it."""
    out = {}
    for name, e in benches.items():
        m = re.match(r"test_bench_train_step\[(.*)\]$", name)
        if not m:
            continue
        out[m.group(1)] = {k: e.get(k) for k in ("images_per_s", "mfu_pct", "mfu_vs_measured_sgemm_pct",
                                                 "peak_memory_GiB", "speedup_vs_reference", "attn", "loss",
                                                 "compiled", "precision", "optimizer")}
    for name, row in out.items():
        if not name.endswith("-deepspeed_zero2"):
            continue
        model = name[:-len("-deepspeed_zero2")]
        same_compute = "optimized_bf16_weights" if "bf16" in str(row.get("precision")) else "optimized"
        same = out.get(f"{model}-{same_compute}")
        if same and _num(same.get("images_per_s")) and _num(row.get("images_per_s")):
            row["engine_time_vs_same_compute"] = same["images_per_s"] / row["images_per_s"]
    return out


def by_prefix(benches, prefix):
    return {name[len(prefix) + 1:-1]: e for name, e in benches.items() if name.startswith(prefix + "[")}


def cuda_tests(work, errors):
    """Counts from the pytest log (written as the tests run: a killed run keeps its lines)."""
    try:
        text = open(os.path.join(work, "cuda_tests.log"), errors="replace").read()
    except FileNotFoundError:
        return None
    except OSError as e:
        errors.append(f"cuda_tests.log: {e}")
        return None
    out = {k: len(re.findall(rf" {k.upper()}\b", text)) for k in ("passed", "failed", "skipped", "error")}
    out["failed_tests"] = sorted(set(re.findall(r"^FAILED (\S+)", text, re.M)))[:20]
    tail = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    out["pytest_summary"] = tail[-1].strip("= ") if tail else None
    return out


def summarize(work):
    errors = []
    info = {"work_dir": work}
    info.update(_scalars(_load_json(os.path.join(work, "versions.json"), errors)))
    steps = {}
    for s in _load_jsonl(os.path.join(work, "steps.jsonl"), errors):
        if isinstance(s, dict) and s.get("step"):
            steps[s["step"]] = {k: s.get(k) for k in ("exit", "seconds", "timeout_s", "status")}
    info["steps"] = steps
    info["elapsed_s"] = sum(s.get("seconds") or 0 for s in steps.values())
    sections = (
        ("fused_loss", lambda b: fused_loss(work, b, errors)),
        ("train_step", train_step),
        ("attention", lambda b: by_prefix(b, "test_bench_attention")),
        ("data", lambda b: {n: e for n, e in b.items() if n.startswith(("test_gpu", "test_cpu", "test_verify_scan"))}),
        ("teacher", lambda b: by_prefix(b, "test_bench_resnet50_teacher")),
    )
    benches = _benchmarks(work, errors)
    for key, fn in sections:
        try:
            info[key] = fn(benches)
        except Exception as e:  # noqa: BLE001 - one bad section must not lose the others
            errors.append(f"{key}: {type(e).__name__}: {e}")
            info[key] = None
    mmb = _load_json(os.path.join(work, "max_micro_batch.json"), errors)
    info["max_micro_batch"] = {k: v for k, v in mmb.items() if k != "probes"} if isinstance(mmb, dict) else None
    profile = _load_json(os.path.join(work, "profile.json"), errors)
    info["profile"] = profile if isinstance(profile, dict) else None
    try:
        info["cuda_tests"] = cuda_tests(work, errors)
    except Exception as e:  # noqa: BLE001
        errors.append(f"cuda_tests: {type(e).__name__}: {e}")
    info["errors"] = list(dict.fromkeys(errors))
    return info


def _f(x, fmt=".1f", unit=""):
    """A figure for the table: rounded with its unit, or "-" where it was not measured."""
    return f"{x:{fmt}}{unit}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def print_table(info):
    print(f"device {info.get('device')}  torch {info.get('torch')}  triton {info.get('triton')}  "
          f"commit {info.get('commit')}  {info.get('date')}")
    for name, s in (info.get("steps") or {}).items():
        print(f"  step {name:22s} {s.get('status')}  {s.get('seconds')} s of {s.get('timeout_s')}")
    print("fused loss fwd+bwd (pct of the R*C*(2P+T) HBM bound; x eager; x torch.compile):")
    for name, r in (info.get("fused_loss") or {}).items():
        print(f"  {name:48s} {_f(r.get('time_us'), unit=' us')}  {_f(r.get('GB/s'), unit=' GB/s')}  "
              f"{_f(r.get('pct_of_hbm_bound'), unit='%')}  x{_f(r.get('speedup_vs_eager'), '.2f')} eager  "
              f"x{_f(r.get('speedup_vs_compiled'), '.2f')} compiled  {r.get('note') or ''}")
    for name, r in (info.get("train_step") or {}).items():
        engine = f"  engine x{_f(r.get('engine_time_vs_same_compute'), '.2f')} time" \
            if "engine_time_vs_same_compute" in r else ""
        mfu = r["mfu_pct"] if r.get("mfu_pct") is not None else r.get("mfu_vs_measured_sgemm_pct")
        print(f"  train {name:36s} {_f(r.get('images_per_s'), unit=' img/s')}  MFU {_f(mfu, unit='%')}  "
              f"x{_f(r.get('speedup_vs_reference'), '.2f')} vs reference  "
              f"peak {_f(r.get('peak_memory_GiB'), unit=' GiB')}{engine}")
    for name, r in (info.get("attention") or {}).items():
        print(f"  attention {name:28s} {_f(r.get('TFLOP/s'), unit=' TFLOP/s')}")
    for name, r in (info.get("teacher") or {}).items():
        print(f"  teacher resnet50 {name:12s} {_f(r.get('images_per_s'), unit=' img/s')}  "
              f"x{_f(r.get('speedup_vs_batch_norms'), '.2f')}")
    mmb = info.get("max_micro_batch") or {}
    if mmb:
        peak = mmb.get("peak_bytes_at_max")
        print(f"  max micro-batch {mmb.get('model')}: {mmb.get('max_micro_batch_found')} "
              f"(estimator {mmb.get('estimated_max_micro_batch')}), "
              f"peak {_f(peak / 2**30 if peak else None, '.2f', ' GiB')}")
    prof = info.get("profile") or {}
    if prof.get("phases_ms"):
        print(f"  profile {prof.get('model')} (eager): " + ", ".join(
            f"{k} {v:.1f}" for k, v in prof["phases_ms"].items()) + " ms")
    if info.get("cuda_tests"):
        print(f"  cuda tests: {info['cuda_tests'].get('pytest_summary')}")
    for e in info.get("errors") or []:
        print("  could not read:", e)


def main(argv):
    if len(argv) != 3:
        print("usage: python bench/summarize.py WORK_DIR OUT.json", file=sys.stderr)
        return 2
    info = summarize(argv[1])
    tmp = argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, default=str)
    os.replace(tmp, argv[2])  # never a half-written summary
    print_table(info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
