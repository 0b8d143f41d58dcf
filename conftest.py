"""Shared by tests/ and bench/: the `cuda` marker, and Triton's CPU interpreter when no GPU.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before
any test module imports `kernels`. CI sets it as well.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when none is present)")
