"""Shared by the end-to-end tests: run img2vec/train.py in real processes on tiny settings."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from img2vec.checkpoint import checkpoint_dir, step_tag  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "img2vec" / "train.py"
# The reliability tests drive TRAIN_PY when set (another copy of train.py, e.g. an older one) and
# inject faults through this launcher.
TRAIN_UNDER_TEST = Path(os.environ.get("TRAIN_PY", TRAIN))
INJECT = REPO / "tests" / "fault_injection.py"


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
          expect_rc: int = 0, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run train.py (plain python for 1 process, the deepspeed launcher for more) in `cwd`, where a
    relative run_dir lives; fail with its log."""
    args = train_args(run_dir, data_dir, ds_config, *extra)
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port()), str(TRAIN), *args]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test session's temp folder, one for all pytest-xdist workers (a worker's own is a folder in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that build(folder) fills once per test session, however many tests and pytest-xdist
    workers ask for it: the first builds it under a file lock, the others wait and reuse it. Tests
    read it; one that changes files copies it first (shutil.copytree)."""
    folder = session_root(tmp_path_factory) / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def fault_env(**faults: str) -> dict:
    """The environment of a train.py process with these faults (fault_injection.py: FAULT_<NAME>)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "TRAIN_PY": str(TRAIN_UNDER_TEST),
            **{f"FAULT_{k.upper()}": v for k, v in faults.items()}}


def run_train(run: Path, data_dir: Path, ds: Path, *extra: str, expect_rc: int | None = 0,
              **faults: str) -> subprocess.CompletedProcess:
    """train.py in one plain python process (through the fault injector when faults are given)."""
    script = [str(INJECT)] if faults else [str(TRAIN_UNDER_TEST)]
    proc = subprocess.run([sys.executable, *script, *train_args(run, data_dir, ds, *extra)], cwd=REPO,
                          env=fault_env(**faults), capture_output=True, text=True, timeout=600)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"rc {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def truncate(path: Path, keep: int) -> None:
    """Cut an image file after `keep` bytes: a header PIL opens, data it cannot decode."""
    path.write_bytes(path.read_bytes()[:keep])


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in a TensorBoard folder's event files ({} without the folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(folder):
        return {}
    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
