#!/usr/bin/env bash
# The one prepared GPU check of issue 7 (speed and scale). Run from the project root:
#
#   on the CPU machine, once:  bash ../shared/device/fetch-wheels.sh      (puts deepspeed & co. in .whl/)
#   on the device:             run(command="PYTHONUNBUFFERED=1 bash bench/device_check.sh",
#                                  carry=[".whl"], timeout_s=540)
#   dry run on a CPU machine:  bash bench/device_check.sh --dry-run      (CPU shapes, simulated search)
#
# Steps, each under its own `timeout` so one slow step cannot eat the others (about 7 minutes
# in all on one H100; the budget is 8):
#   1. install the carried wheels into /tmp/site (the device image has no deepspeed/hjson/pydantic)
#   2. the CUDA-marked tests of attention and the fused loss                          (<= 90 s)
#   3. benchmarks, one pytest-benchmark JSON per file, merged into $OUT/bench.json:
#      train step (ViT-B/L/H, reference vs optimized; ViT-B compiled)                  (<= 300 s)
#      attention backends, masked feature loss, data path                              (<= 60 s each)
#   4. ViT-H/14 largest micro-batch, ZeRO-3 + grad ckpt on every block, one GPU          (<= 150 s)
#   5. a summary on stdout and $OUT/device_check.json: device, torch / triton / deepspeed
#      versions, date, commit, the issue's figures (ViT-B img/s, MFU, optimized/reference ratio,
#      ViT-H max micro-batch and peak memory). Copy it to bench/results/ to commit it.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-/tmp/device_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[device_check +$(( $(date +%s) - T0 ))s] $*"; }
declare -A STATUS

# 1. wheels -------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1 && [ $DRY = 1 ]; then
  # the wheels are for the device's Python 3.12: check that they install there, use the local deepspeed
  rm -rf /tmp/site_dry_run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --only-binary=:all: \
    --python-version 3.12 --target /tmp/site_dry_run .whl/*.whl && STATUS[wheels]="ok (dry run: installed for 3.12, not used)" \
    || STATUS[wheels]=failed
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; STATUS[wheels]=ok
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; STATUS[wheels]=failed
  fi
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; STATUS[wheels]="none carried (.whl/ empty)"
fi
stamp "wheels: ${STATUS[wheels]}"
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device:",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
try:
    import deepspeed; print("deepspeed", deepspeed.__version__, "from", deepspeed.__file__)
except Exception as e:
    print("deepspeed not importable:", type(e).__name__, e)
PY
if [ $DRY = 0 ] && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  stamp "WARNING: no CUDA device here; figures will be CPU ones (use --dry-run on purpose)"
fi

# 2. CUDA-marked tests --------------------------------------------------------------------
TESTS=$(grep -l "mark.cuda" tests/test_attention.py tests/test_masked_feature_loss.py 2>/dev/null)
timeout 90 python3 -m pytest -m cuda -q -rs -p no:cacheprovider $TESTS --junitxml="$OUT/cuda_tests.xml" \
  >"$OUT/cuda_tests.log" 2>&1
STATUS[cuda_tests]=$?; tail -n 5 "$OUT/cuda_tests.log"
stamp "cuda tests: exit ${STATUS[cuda_tests]}"

# 3. benchmarks, one JSON per file (a file that runs over its time still leaves the others) ---
export IMG2VEC_BENCH_COMPILE="${IMG2VEC_BENCH_COMPILE:-vit_base}"
bench() {  # name, seconds, file
  timeout "$2" python3 -m pytest "$3" --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_$1.json" >"$OUT/bench_$1.log" 2>&1
  STATUS[bench_$1]=$?; tail -n 3 "$OUT/bench_$1.log"; stamp "bench $1: exit ${STATUS[bench_$1]}"
}
bench train_step 300 bench/test_bench_train_step.py
bench attention 60 bench/test_bench_attention.py
bench masked_feature_loss 60 bench/test_bench_masked_feature_loss.py
bench data 60 bench/test_bench_data.py

# 4. ViT-H largest micro-batch (ZeRO-3 + grad ckpt, one GPU) ------------------------------
if [ $DRY = 1 ]; then
  timeout 150 python3 bench/max_micro_batch.py --dry-run --json "$OUT/max_micro_batch.json" 2>&1 \
    | grep -v "WARNING\|INFO" | tee "$OUT/max_micro_batch.log"
else
  timeout 150 python3 bench/max_micro_batch.py --model vit_huge --budget-s 100 --probe-timeout-s 90 --json "$OUT/max_micro_batch.json" 2>&1 \
    | grep -v "WARNING\|INFO" | tee "$OUT/max_micro_batch.log"
fi
STATUS[max_micro_batch]=${PIPESTATUS[0]}
stamp "max micro-batch: exit ${STATUS[max_micro_batch]}"

# 5. summary ------------------------------------------------------------------------------
STATUS_JSON=$(for k in "${!STATUS[@]}"; do printf '"%s": "%s",' "$k" "${STATUS[$k]}"; done)
OUT="$OUT" STATUS_JSON="{${STATUS_JSON%,}}" ELAPSED=$(( $(date +%s) - T0 )) python3 - <<'PY'
import datetime, glob, json, os, subprocess
import torch
out = os.environ["OUT"]
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "elapsed_s": int(os.environ["ELAPSED"]),
        "steps": json.loads(os.environ["STATUS_JSON"])}
for mod in ("triton", "deepspeed"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"not importable ({type(e).__name__})"
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
except FileNotFoundError:
    info["commit"] = None
merged = None
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        data = json.load(open(path))
    except Exception:
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    json.dump(merged, open(os.path.join(out, "bench.json"), "w"), indent=1)
rows = {b["name"]: b for b in (merged or {}).get("benchmarks", [])}
summary = {}
print("\n=== train step (images/s, MFU, peak memory) ===")
for name, b in rows.items():
    if name.startswith("test_bench_train_step["):
        e = b["extra_info"]
        mfu = e.get("mfu_pct", e.get("mfu_vs_measured_sgemm_pct"))
        key = name[len("test_bench_train_step["):-1]
        summary[key] = {k: e.get(k) for k in ("images_per_s", "mfu_pct", "mfu_vs_measured_sgemm_pct",
                                              "peak_memory_GiB", "speedup_vs_reference", "attn", "loss", "compiled")}
        mfu_of = "" if "mfu_pct" in e else " of measured sgemm"
        print(f"  {key:24s} {e['images_per_s']:9.1f} img/s  MFU {mfu if mfu is None else round(mfu, 1)}%{mfu_of}  "
              f"peak {e.get('peak_memory_GiB')} GiB  x{e.get('speedup_vs_reference', 1.0):.2f} vs reference  "
              f"[{e.get('attn')}, {e.get('loss')} loss, compiled={e.get('compiled')}]")
info["train_step"] = summary
print("=== attention fwd+bwd (TFLOP/s) ===")
att = {}
for name, b in rows.items():
    if name.startswith("test_bench_attention["):
        e = b["extra_info"]
        att[name[len("test_bench_attention["):-1]] = round(e["TFLOP/s"], 2)
        print(f"  {name[len('test_bench_attention['):-1]:32s} {e['TFLOP/s']:8.2f} TFLOP/s  "
              f"{e.get('pct_of_peak', float('nan')):5.1f}% of peak  x{e.get('speedup_vs_math', 1.0):.2f} vs math")
info["attention_tflops"] = att
try:
    mmb = json.load(open(os.path.join(out, "max_micro_batch.json")))
    info["max_micro_batch"] = {k: v for k, v in mmb.items() if k != "probes"}
    peak = mmb.get("peak_bytes_at_max")
    print(f"=== {mmb['model']} ZeRO-3 + grad ckpt, one device: max micro-batch {mmb['max_micro_batch_found']} "
          f"(first failing {mmb['first_failing']}, estimator {mmb['estimated_max_micro_batch']}), "
          f"peak {peak / 2**30 if peak else float('nan'):.2f} GiB "
          f"(estimator {(mmb.get('estimated_bytes_at_max') or float('nan')) / 2**30:.2f} GiB), "
          f"{mmb.get('images_per_s_at_max') or float('nan'):.1f} img/s ===")
except (OSError, ValueError, KeyError) as e:
    print("=== max micro-batch: no result:", type(e).__name__, e)
print("steps:", info["steps"], f"elapsed {info['elapsed_s']} s")
dev = info["device"].replace(" ", "_").replace("/", "_")
path = os.path.join(out, f"device_check_{dev}_{info['date'][:10]}.json")
json.dump(info, open(path, "w"), indent=2)
print("wrote", path, "and", os.path.join(out, "bench.json"))
PY
