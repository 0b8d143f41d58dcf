"""Benchmarks run in one process: pytest.ini's `-n auto` would put two timed loops on the same cores
(and pytest-benchmark turns itself off under xdist)."""


def pytest_xdist_auto_num_workers(config):
    return 0
