"""Benchmarks run in one process: pytest.ini's `-n auto` would put two timed loops on the same cores
(and pytest-benchmark turns itself off under xdist)."""
import os

import pytest
import torch

# CPU threads for the timed code: 1 by default. On the shared 2-core machine, with another job
# busy on one core, two OpenMP threads made a vit_tiny step 20-40x slower (4-8 s vs 0.2 s) and
# the figures meaningless; set IMG2VEC_BENCH_THREADS to use more on a quiet machine.
CPU_THREADS = int(os.environ.get("IMG2VEC_BENCH_THREADS", "1"))


def pytest_xdist_auto_num_workers(config):
    return 0


@pytest.fixture(scope="module")
def bench_cpu_threads():
    """CPU_THREADS torch threads for a module's timed code (no change on a GPU machine)."""
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)
