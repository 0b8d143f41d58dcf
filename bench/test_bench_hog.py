"""Benchmark of the HOG teacher (img2vec/hog.py): the histogram as one scatter-add vs 9 masked pools.

    pytest bench/test_bench_hog.py --benchmark-only [--benchmark-json=bench/results/X.json]

Images (B, 3, S, S) fp32 already on the device -> targets (B, N, 108) at patch 16. Each case
first asserts that both histogram paths give the same targets (rtol/atol 1e-5), then times
the whole teacher forward. Reported: images/s, and GB/s over the bytes the histogram step must
touch at least (magnitude fp32 + bin int64 per pixel and channel in, the histograms out).
CPU: the embedded default's micro-batch (32 x 96 px, where scatter is the default); CUDA: 256 x 224
px (where the pools are the default: CUDA's scatter_add is atomic, so not bitwise repeatable).
"""
import pytest
import torch

from img2vec import hog
from img2vec.hog import HOG_BINS, HOG_CELL

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH, SIZE = (256, 224) if CUDA else (32, 96)
ROUNDS = 20 if CUDA else 10
pytestmark = pytest.mark.usefixtures("bench_cpu_threads")  # bench/conftest.py


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("scatter", [True, False], ids=["scatter", "pools"])
def test_bench_hog_teacher(benchmark, monkeypatch, scatter):
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    teacher = hog.WeightFreeTeacher("hog", 16, SIZE)
    default = teacher(images)
    histograms = hog.cell_histograms
    monkeypatch.setattr(hog, "cell_histograms", lambda m, b: histograms(m, b, scatter=scatter))
    torch.testing.assert_close(teacher(images), default, rtol=1e-5, atol=1e-5)

    def run():
        teacher(images)
        _sync()

    benchmark.group = f"hog-teacher-{BATCH}x{SIZE}px-{DEVICE}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the parity check was the test
        return
    median = benchmark.stats.stats.median
    pixels = BATCH * 3 * SIZE * SIZE
    histogram_bytes = pixels * (4 + 8) + pixels // (HOG_CELL * HOG_CELL) * HOG_BINS * 4
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu",
                                 "images_per_s": BATCH / median, "ms": 1e3 * median,
                                 "histogram_min_GB_per_s": histogram_bytes / median / 1e9})
