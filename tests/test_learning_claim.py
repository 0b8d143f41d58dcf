"""The embedded default learns something it can show (needs train.py's verdict and alarm wiring).

Runs train.py, the public entry point, on the embedded default (sample photographs, the default
teacher) for a shortened schedule, then checks what the run itself says and writes:
    - its last log line is the verdict, `learned: kNN top-1 X% vs Y% at random init (+Z)`;
    - metrics.jsonl holds the two numbers (verdict_knn_top1, verdict_knn_top1_random_init), and
      img2vec.verdict recomputes them from the exported encoder;
    - the collapse alarm stayed quiet, and the gain is at least MARGIN.
MARGIN and the schedule come from the runs listed in docs/collapse.md (seeds 0, 1, 2).
"""
import json
import os
import subprocess
import sys

import pytest
from train_helpers import REPO, TRAIN, free_port, write_ds_config

from img2vec.verdict import run_verdict

STEPS = 120  # shortened from the default's 360 (45 epochs of 8 steps); the cosine runs over these 120
# kNN top-1 points. Measured (docs/collapse.md), this schedule over seeds 0 / 1 / 2: +3.5 / +3.9 / +5.5
# (the full 360 steps: +9.4 / +9.0 / +12.1); 2.0 sits 1.5 points (~4 of the 256 val crops) under the smallest.
MARGIN = 2.0


@pytest.mark.e2e
@pytest.mark.timeout(900)  # about 90 s alone, with the verdict
def test_embedded_default_beats_its_random_init(tmp_path):
    run = tmp_path / "run"
    ds = write_ds_config(tmp_path / "ds.json", 2, 32)  # configs/ds_zero2.json's engine
    cmd = [sys.executable, str(TRAIN), "--ds_config", str(ds), "--output_dir", str(run), "--max_steps", str(STEPS),
           "--seed", "0", "--num_workers", "0", "--ckpt_every", "0"]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if "img2vec" in line and "pretrain:" not in line]
    assert "learned: kNN top-1" in lines[-1], lines[-3:]
    assert not any("collapse alarm at step" in line for line in lines)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == STEPS and {"verdict_knn_top1", "verdict_knn_top1_random_init"} <= set(last)
    again = run_verdict(str(run), seed=0)
    assert again.pretrained == pytest.approx(last["verdict_knn_top1"], abs=1e-6)
    assert again.random_init == pytest.approx(last["verdict_knn_top1_random_init"], abs=1e-6)
    print(f"\n{again.line()}")
    assert again.gain >= MARGIN, again.line()
