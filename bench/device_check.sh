#!/usr/bin/env bash
# The one prepared GPU check: fused loss, train step, attention, data path, ViT-H micro-batch.
# Run from the project root:
#
#   first put wheels of deepspeed & co. that match the GPU machine's torch in .whl/ (the GPU
#   machine has no package index); then on the GPU machine:  bash bench/device_check.sh
#   dry run on a CPU machine:  bash bench/device_check.sh --dry-run      (CPU shapes, same steps)
#
# Time: every step runs under its own `timeout`; the budgets below add up to 535 s, and each
# step is also cut to what is left of TOTAL_S (545 s, summary and archive included), so the
# whole check ends inside 545 s on one H100, and the steps that failed can be rerun in the
# same 15 minutes of device time:  DEVICE_CHECK_ONLY="bench_loss max_micro_batch" bash bench/device_check.sh
#
# Exit status: 0 when every step that ran is ok, 1 when any failed or timed out (the others still run).
#
# Results as it goes: steps write into $WORK (outside $OUT); after every step the summary
# (bench/summarize.py) and a .tar.gz of $WORK are refreshed in $OUT, so a step killed by its
# timeout, or the whole command killed, keeps every result before it. $OUT holds 2 files:
#   $OUT/device_check.json   the summary: versions, device, date, commit, steps, the figures
#   $OUT/logs.tar.gz         every log, pytest-benchmark JSON and JSONL of the run
# Copy device_check.json to bench/results/device_check_<device>_<date>.json to commit it.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-/tmp/device_check_out}"
WORK="${DEVICE_CHECK_WORK:-/tmp/device_check_work}"
TOTAL_S=545
ONLY="${DEVICE_CHECK_ONLY:-}"   # space-separated step names; empty: all (wheels and versions always run)
RESERVE_S=10   # the last summary and archive
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[device_check +$(( $(date +%s) - T0 ))s] $*"; }

# name -> seconds; 535 in all (checked below)
declare -A BUDGET=(
  [wheels]=15 [versions]=10 [cuda_tests]=40 [bench_loss]=80
  [train_vit_base]=110 [train_engine_vit_base]=60 [train_vit_large]=30 [train_vit_huge]=30
  [bench_attention]=25 [bench_data_gpu]=17 [bench_data_cpu]=18 [max_micro_batch]=55
  [profile_vit_base]=30 [bench_teacher]=15
)
SUM=0; for k in "${!BUDGET[@]}"; do SUM=$(( SUM + BUDGET[$k] )); done
if [ $(( SUM + RESERVE_S )) -gt $TOTAL_S ]; then
  echo "device_check: step budgets add up to $SUM s + $RESERVE_S s reserve > $TOTAL_S s: fix BUDGET"; exit 2
fi
stamp "budgets: $SUM s of steps + $RESERVE_S s reserve <= $TOTAL_S s"

publish() {  # summary JSON + archive of $WORK into $OUT, each replaced atomically
  timeout 20 python3 bench/summarize.py "$WORK" "$OUT/device_check.json" >"$WORK/summary.log" 2>&1
  tar -czf "$OUT/.logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT/.logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

step() {  # step NAME COMMAND...: run under min(budget, time left), log to $WORK/NAME.log, record
  local name=$1; shift
  if [ -n "$ONLY" ] && [ "$name" != versions ] && [ "$name" != wheels ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$(( TOTAL_S - RESERVE_S - ($(date +%s) - T0) ))
  local t=${BUDGET[$name]}; [ "$left" -lt "$t" ] && t=$left
  local t1=$(date +%s) rc st
  if [ "$t" -lt 3 ]; then
    rc=-1; st="not run (no time left)"
  else
    timeout -k 3 "$t" "$@" >"$WORK/$name.log" 2>&1; rc=$?
    case $rc in 0) st=ok ;; 124|137) st="timed out" ;; 5) st="no tests selected" ;; *) st=failed ;; esac
  fi
  printf '{"step": "%s", "exit": %s, "seconds": %s, "timeout_s": %s, "status": "%s"}\n' \
    "$name" "$rc" "$(( $(date +%s) - t1 ))" "$t" "$st" >>"$WORK/steps.jsonl"
  [ -f "$WORK/$name.log" ] && tail -n 3 "$WORK/$name.log"
  stamp "$name: $st (exit $rc)"
  publish
}
trap publish EXIT

# 1. wheels: the device image has no deepspeed/hjson/pydantic ---------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ $DRY = 1 ]; then  # built for the device's Python 3.12: check that they install there, use none
    step wheels python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --only-binary=:all: \
      --python-version 3.12 --target "$WORK/site_dry_run" .whl/*.whl
    rm -rf "$WORK/site_dry_run"
  else
    step wheels python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    [ -d /tmp/site/deepspeed ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
else
  step wheels true
  if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)"; then
    stamp "no wheels carried (.whl/ empty): using the deepspeed installed here"
  else
    stamp "no wheels carried (.whl/ empty) and no deepspeed installed: the engine and ZeRO steps will fail"
  fi
fi

# 2. versions: device, torch / triton / deepspeed, date, commit -------------------------------
step versions python3 -c '
import datetime, json, subprocess, sys
import torch
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
from importlib import metadata  # versions without importing (deepspeed takes seconds)
for mod in ("triton", "deepspeed"):
    try:
        info[mod] = metadata.version(mod)
    except Exception as e:
        info[mod] = f"not installed ({type(e).__name__})"
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
try:
    info["commit"], info["dirty"] = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
except OSError:
    info["commit"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
' "$WORK/versions.json"
if [ $DRY = 0 ] && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  stamp "WARNING: no CUDA device here; figures will be CPU ones (use --dry-run on purpose)"
fi

# 3. CUDA-marked tests (-v: one line per test as it finishes, kept if the step is killed) -------
step cuda_tests python3 -m pytest -m cuda -v -rs -p no:cacheprovider \
  tests/test_masked_feature_loss.py tests/test_attention.py tests/test_memory.py

# 4. benchmarks: the fused loss writes one JSON line per finished case ------------------------
bench() {  # bench NAME FILE [pytest args]: pytest-benchmark JSON at the end of each call
  local name=$1 file=$2; shift 2
  step "$name" python3 -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$WORK/$name.json" "$@"
}
export IMG2VEC_BENCH_JSONL="$WORK/loss.jsonl"
if [ $DRY = 1 ]; then  # CPU: no torch.compile of the reference (a cold CPU compile takes minutes)
  bench bench_loss bench/test_bench_masked_feature_loss.py -k "not compiled"
else
  bench bench_loss bench/test_bench_masked_feature_loss.py
fi
# train step, one model per call so that a slow model keeps the ones before it; ViT-B gets the
# largest budget: its optimized configuration includes torch.compile of student and teacher
export IMG2VEC_BENCH_COMPILE="${IMG2VEC_BENCH_COMPILE:-vit_base}"
if [ $DRY = 1 ]; then
  bench train_vit_base bench/test_bench_train_step.py -k vit_tiny   # the CPU's one model
else
  bench train_vit_base bench/test_bench_train_step.py -k "vit_base and not deepspeed"
  # the DeepSpeed engine's step apart: a hang there must not lose the rows above
  bench train_engine_vit_base bench/test_bench_train_step.py -k "vit_base and deepspeed"
  bench train_vit_large bench/test_bench_train_step.py -k vit_large
  bench train_vit_huge bench/test_bench_train_step.py -k vit_huge
fi
bench bench_attention bench/test_bench_attention.py
bench bench_teacher bench/test_bench_teacher.py   # batch norms folded vs run
# data path: GPU decode and the CPU loaders in two calls (each JSON is written at its end)
bench bench_data_gpu bench/test_bench_data.py -k "gpu"
bench bench_data_cpu bench/test_bench_data.py -k "cpu_backends or verify_scan"

# 5. ViT-H largest micro-batch (ZeRO-3 + grad ckpt, one GPU) ----------------------------------
if [ $DRY = 1 ]; then
  step max_micro_batch python3 bench/max_micro_batch.py --dry-run --start 8 --budget-s 30 --probe-timeout-s 20 \
    --json "$WORK/max_micro_batch.json"
else
  step max_micro_batch python3 bench/max_micro_batch.py --model vit_huge --budget-s 40 --probe-timeout-s 30 \
    --json "$WORK/max_micro_batch.json"
fi

# 6. where a ViT-B step's time goes (eager: kernel names that say which layer) -----------------
step profile_vit_base python3 bench/profile_step.py --json "$WORK/profile.json"

# 7. summary --------------------------------------------------------------------------------
trap - EXIT
publish
cat "$WORK/summary.log"
stamp "done: $OUT/device_check.json and $OUT/logs.tar.gz ($(ls "$OUT" | wc -l) files in \$OUT)"
not_ok=$(grep -v '"status": "ok"' "$WORK/steps.jsonl" | sed 's/.*"step": "\([^"]*\)".*"status": "\([^"]*\)".*/\1 (\2)/' | tr '\n' ' ')
if [ -n "$not_ok" ]; then
  stamp "steps not ok: $not_ok-> exit 1 (every result before and after them is kept)"; exit 1
fi
