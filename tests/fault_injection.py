"""Test-only launcher: runs img2vec/train.py with faults injected by monkeypatching, so the
production code path stays exactly as shipped. Faults are chosen by environment variables:

    FAULT_SLOW_SAVE=k     during the k-th checkpoint, after DeepSpeed wrote its first file, print
                          FAULT:WRITING and sleep (the test SIGKILLs the process then)
    FAULT_NAN_AT=i,j,...  the teacher targets of these micro-steps (0-based) are all NaN
    FAULT_STEP_DELAY=s    sleep s seconds per micro-step (so a signal lands mid-epoch)
    FAULT_HOLD_AT=i       micro-step i (0-based) prints FAULT:HOLDING and waits while the file
    FAULT_HOLD_FILE=path  `path` exists (the test signals the process, then deletes the file)
    FAULT_NAN_WEIGHTS_AT=k  after the k-th engine.step() (1-based), one weight and ZeRO's fp32
                          master copy become NaN (what an infinite learning rate does)
    FAULT_ENOSPC_AT=k     during the k-th checkpoint, after DeepSpeed wrote its first file, the
                          next write fails with ENOSPC (a full disk)

Usage: python tests/fault_injection.py <train.py arguments>    (TRAIN_PY: another train.py to run)
"""
import errno
import gc
import os
import runpy
import sys
import time
from pathlib import Path

gc.disable()  # start-up as train.py's own __main__ does it; its runtime.end_start_up() turns it back on

REPO = Path(__file__).resolve().parents[1]
TRAIN = Path(os.environ.get("TRAIN_PY", REPO / "img2vec" / "train.py"))
sys.path.insert(0, str(TRAIN.resolve().parents[1]))  # the packages beside that train.py

import torch  # noqa: E402
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from img2vec.teacher import Teacher  # noqa: E402

slow_save = int(os.environ.get("FAULT_SLOW_SAVE", "0"))
nan_at = {int(i) for i in os.environ.get("FAULT_NAN_AT", "").split(",") if i}
step_delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))
nan_weights_at = int(os.environ.get("FAULT_NAN_WEIGHTS_AT", "0"))
enospc_at = int(os.environ.get("FAULT_ENOSPC_AT", "0"))
hold_at = int(os.environ.get("FAULT_HOLD_AT", "-1"))
hold_file = os.environ.get("FAULT_HOLD_FILE", "")

saves = {"checkpoints": 0}
original_create, original_save = TorchCheckpointEngine.create, TorchCheckpointEngine.save


def create(self, info):
    saves["checkpoints"] += 1
    return original_create(self, info)


def save(self, state_dict, path):
    if saves["checkpoints"] == enospc_at and saves.get("written"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    original_save(self, state_dict, path)
    saves["written"] = saves["checkpoints"] == enospc_at
    if saves["checkpoints"] == slow_save:
        print("\nFAULT:WRITING", path, flush=True)
        time.sleep(300)


calls = {"teacher": 0}
original_forward = Teacher.forward


def forward(self, images):
    target = original_forward(self, images)
    calls["teacher"] += 1
    if step_delay:
        time.sleep(step_delay)
    if calls["teacher"] - 1 == hold_at:
        print("\nFAULT:HOLDING", flush=True)
        deadline = time.time() + 300
        while os.path.exists(hold_file) and time.time() < deadline:
            time.sleep(0.05)
    return target.fill_(float("nan")) if calls["teacher"] - 1 in nan_at else target


engine_steps = {"n": 0}
original_step = DeepSpeedEngine.step


def step(self, *args, **kwargs):
    result = original_step(self, *args, **kwargs)
    engine_steps["n"] += 1
    if engine_steps["n"] == nan_weights_at:
        with torch.no_grad():
            next(self.module.parameters()).fill_(float("nan"))
            for flat in getattr(self.optimizer, "single_partition_of_fp32_groups", []):
                flat.fill_(float("nan"))
    return result


TorchCheckpointEngine.create, TorchCheckpointEngine.save = create, save
Teacher.forward = forward
DeepSpeedEngine.step = step
sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
