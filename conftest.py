"""Shared by tests/ and bench/: Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, the one
place, before any test or benchmark module imports `kernels`. CI sets it as well.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
