"""Benchmark of the ResNet-50 stage-3 teacher's forward: batch norms folded into the convolutions
(the default, img2vec/fold_bn.py) vs run as timm builds them (teacher_fold_bn=false).

    pytest bench/test_bench_teacher.py --benchmark-only [--benchmark-json=bench/results/X.json]

Images (B, 3, S, S) fp32 already on the device -> targets (B, (S / 16)^2, 1024). On CUDA the
teacher runs as in train.py (bf16 autocast, channels_last), B = 256 at 224 px; on CPU in fp32,
B = 4 at 128 px. Both teachers share their weights (same seed); the folded one's targets are first
checked against the other's (fp32: relative 1e-4; bf16: 2e-2, the folded weights round
differently). Reported: images/s, and on the folded row its speed-up over the unfolded one.
"""
import pytest
import torch

from img2vec.teacher import Teacher

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH, SIZE = (256, 224) if CUDA else (4, 128)
ROUNDS = 20 if CUDA else 5
pytestmark = pytest.mark.usefixtures("bench_cpu_threads")  # bench/conftest.py
_medians = {}


@pytest.mark.parametrize("fold_bn", [False, True], ids=["batch_norms", "folded"])
def test_bench_resnet50_teacher(benchmark, fold_bn):
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    teacher = Teacher("resnet50", 3, "random", 16, SIZE, seed=0, fold_bn=fold_bn).to(DEVICE)
    assert teacher.folded_bn == (43 if fold_bn else 0)  # every BatchNorm2d up to layer3
    if fold_bn:
        other = Teacher("resnet50", 3, "random", 16, SIZE, seed=0, fold_bn=False).to(DEVICE)
        want, got = other(images), teacher(images)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < (2e-2 if CUDA else 1e-4), err
        del other

    def run():
        teacher(images)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"resnet50-teacher-{BATCH}x{SIZE}px-{DEVICE}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the parity check was the test
        return
    median = _medians[fold_bn] = benchmark.stats.stats.median
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "images_per_s": BATCH / median,
            "ms": 1e3 * median}
    if fold_bn and False in _medians:
        info["speedup_vs_batch_norms"] = _medians[False] / median
    benchmark.extra_info.update(info)
