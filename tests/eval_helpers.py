"""Shared by the evaluation tests: the digits data set and one pretraining run on it, cached per session.

The run is the digits proof's recipe (tests/test_digits_proof.py measures it against random
init); test_eval.py and test_export.py reuse its checkpoint instead of training their own.
"""
import os
import subprocess
import sys
from pathlib import Path

from dataloading.digits import digits_dataset_dir
from train_helpers import REPO, TRAIN, free_port, session_root, shared_dir, write_ds_config

# The digits recipe (docs/evaluation.md says why each setting is what it is): vit_tiny at 32x32, patch 8,
# a random convnext_atto stem as the teacher, peak lr 1e-3 * 64 / 256, cosine to 0 at PROOF_STEPS.
PROOF_STEPS = 400
PROOF_ARGS = ("--model", "vit_tiny", "--image_size", "32", "--patch_size", "8",
              "--teacher", "convnext_atto", "--teacher_stage", "0", "--teacher_weights", "random",
              "--decoder_depth", "2", "--decoder_width", "128", "--decoder_heads", "4", "--mask_ratio", "0.75",
              "--base_lr", "1e-3", "--warmup_epochs", "1", "--num_workers", "0", "--log_every", "50",
              "--ckpt_every", "0", "--diversity_every", "0", "--verdict_data", "")


def digits_root(tmp_path_factory) -> Path:
    """The digits tree (train/, val/) in this session's temp folder, built once."""
    return digits_dataset_dir(cache_dir=session_root(tmp_path_factory) / "img2vec-cache")


def pretrain(run_dir: Path, data_root: Path, seed: int, steps: int = PROOF_STEPS, *extra: str) -> Path:
    """train.py on data_root/train for `steps` optimizer steps (batch 64, fp32 on CPU); returns run_dir."""
    ds = write_ds_config(run_dir.parent / f"{run_dir.name}_ds.json", 1, 64)
    cmd = [sys.executable, str(TRAIN), "--ds_config", str(ds), "--output_dir", str(run_dir),
           "--data_path", str(data_root / "train"), "--seed", str(seed), "--max_steps", str(steps),
           *PROOF_ARGS, *extra]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return run_dir


def digits_run(tmp_path_factory, seed: int = 0) -> Path:
    """The proof's pretraining run for `seed`, trained once per test session (across xdist workers
    too). Tests read it; one that writes into a run copies it first."""
    data = digits_root(tmp_path_factory)
    folder = shared_dir(tmp_path_factory, f"digits_run_seed{seed}", lambda f: pretrain(f / "run", data, seed))
    return folder / "run"
