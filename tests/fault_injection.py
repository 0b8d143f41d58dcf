"""Test-only launcher: runs img2vec/train.py with faults injected by monkeypatching, so the
production code path stays exactly as shipped. Faults are chosen by environment variables:

    FAULT_SLOW_SAVE=k     during the k-th checkpoint, after DeepSpeed wrote its first file, print
                          FAULT:WRITING and sleep (the test SIGKILLs the process then)
    FAULT_NAN_AT=i,j,...  the teacher targets of these micro-steps (0-based) are all NaN
    FAULT_STEP_DELAY=s    sleep s seconds per micro-step (so a signal lands mid-epoch)

Usage: python tests/fault_injection.py <train.py arguments>
"""
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402

from img2vec.teacher import Teacher  # noqa: E402

slow_save = int(os.environ.get("FAULT_SLOW_SAVE", "0"))
nan_at = {int(i) for i in os.environ.get("FAULT_NAN_AT", "").split(",") if i}
step_delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))

saves = {"checkpoints": 0}
original_create, original_save = TorchCheckpointEngine.create, TorchCheckpointEngine.save


def create(self, info):
    saves["checkpoints"] += 1
    return original_create(self, info)


def save(self, state_dict, path):
    original_save(self, state_dict, path)
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
    return target.fill_(float("nan")) if calls["teacher"] - 1 in nan_at else target


TorchCheckpointEngine.create, TorchCheckpointEngine.save = create, save
Teacher.forward = forward
sys.argv = [str(REPO / "img2vec" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
