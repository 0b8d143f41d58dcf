"""Shared by the end-to-end tests: run img2vec/train.py in real processes on tiny settings."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from img2vec.checkpoint import checkpoint_dir, step_tag  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "img2vec" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(path: Path, stage: int, micro_batch: int) -> Path:
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                                "gradient_clipping": 1.0, "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": stage}}))
    return path


def train_args(run_dir: Path, data_dir: Path, ds_config: Path, *extra: str) -> list[str]:
    return ["--ds_config", str(ds_config), "--output_dir", str(run_dir), "--data_path", str(data_dir),
            "--teacher", "resnet18", "--teacher_stage", "2", "--teacher_weights", "random",
            "--image_size", "32", "--patch_size", "8", "--decoder_depth", "1", "--decoder_width", "32",
            "--decoder_heads", "2", "--num_workers", "0", "--log_every", "1", "--warmup_epochs", "0",
            "--verdict_data", "", *extra]  # the verdict has its own test


def train(run_dir: Path, data_dir: Path, ds_config: Path, *extra: str, nproc: int = 1,
          expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run train.py (plain python for 1 process, the deepspeed launcher for more); fail with its log."""
    args = train_args(run_dir, data_dir, ds_config, *extra)
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port()), str(TRAIN), *args]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


