"""Benchmark of the data backends: images/s of decode + RandomResizedCrop(224) + flip + normalize.

    pytest bench/test_bench_data.py --benchmark-only [--benchmark-json=bench/results/X.json]

Cases, on the bundled sample JPEGs (256 real photographs, 160-256 px short side, ~19 kB):
  torch          torchvision loader, `workers` DataLoader processes decoding with PIL
  dali           DALI, our sampler feeds bytes + crop boxes, DALI decodes the window
on the CPU with equal worker counts (DALI: CPU threads = workers = all cores), and on a GPU
additionally DALI's mixed decoder and torchvision.io.decode_jpeg(device="cuda").
Before timing, the DALI output is checked against the torch backend's for the same files
(central view, mean |diff| < 0.5/255). Each round times the steady state: the iterator is
started and its first batch taken outside the timer (worker / pipeline start-up is a
once-per-epoch cost, reported separately as startup_s). extra_info: img_per_s (median
round), ratio_vs_torch on the DALI rows, and for `verify`'s header check, files_per_s.
"""
import os
import time

import pytest
import torch

from dataloading import LoaderSpec, build_loader, sample_dataset_dir
from dataloading.dali import dali_import_error
from dataloading.datasets import IMAGENET_STD

CUDA = torch.cuda.is_available()
WORKERS = os.cpu_count() or 1
SIZE, MICRO = 224, 32
STD = torch.tensor(IMAGENET_STD)[:, None, None]
_img_per_s: dict[str, float] = {}  # case -> median images/s, for the ratios
# DALI is a dependency of the package, but a machine may lack it (the GPU image has no wheel of it)
DALI_MISSING = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_MISSING is not None, reason=f"NVIDIA DALI not importable ({DALI_MISSING})")


@pytest.fixture(scope="module")
def data_dir():
    return sample_dataset_dir()  # 256 images: 8 batches of 32 per epoch


def _loader(data_dir, backend, device="cpu", **kwargs):
    spec = LoaderSpec(data_path=str(data_dir), image_size=SIZE, micro_batch=MICRO, num_workers=WORKERS,
                      backend=backend, dali_device=device, **kwargs)
    return build_loader(spec)


def _check_parity(data_dir, backend, device):
    """The case's output for the first batch (central view) against the torch backend's: same files, close pixels."""
    if backend == "torch":
        return
    ref = next(iter(_loader(data_dir, "torch", augment=False, shuffle=False)))
    out = next(iter(_loader(data_dir, backend, device, augment=False, shuffle=False)))
    by_index = {i: image for i, image in zip(ref["index"].tolist(), ref["images"])}
    pairs = [(image.float().cpu(), by_index[i]) for i, image in zip(out["index"].tolist(), out["images"]) if i in by_index]
    assert pairs, "no common files in the first batch"
    diff = torch.stack([((a - b).abs() * STD * 255).mean() for a, b in pairs]).mean().item()
    assert diff < (3.0 if device == "gpu" else 0.5), diff


def _run(benchmark, data_dir, case, backend, device="cpu"):
    _check_parity(data_dir, backend, device)
    loader = _loader(data_dir, backend, device)
    state = {"epoch": 0, "startup": []}

    def setup():
        start = time.perf_counter()
        batches = loader.iter_from(state["epoch"], 0)
        next(batches)  # workers / pipeline started, first batch out
        state["startup"].append(time.perf_counter() - start)
        state["epoch"] += 1
        return (batches,), {}

    def consume(batches):
        n = 0
        for batch in batches:
            n += batch["images"].shape[0]
        if device == "gpu":
            torch.cuda.synchronize()
        return n

    images = benchmark.pedantic(consume, setup=setup, rounds=5, iterations=1)
    assert images == MICRO * (loader.steps_per_epoch - 1)
    if benchmark.stats is None:  # --benchmark-disable: the parity check and the count were the test
        return
    _img_per_s[case] = images / benchmark.stats.stats.median
    benchmark.extra_info.update(
        backend=loader.backend, workers=WORKERS, image_size=SIZE,
        micro_batch=MICRO, img_per_s=round(_img_per_s[case], 1),
        startup_s=round(sorted(state["startup"])[len(state["startup"]) // 2], 3),
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({WORKERS} cores)",
    )
    if "torch" in _img_per_s and case != "torch":
        benchmark.extra_info["ratio_vs_torch"] = round(_img_per_s[case] / _img_per_s["torch"], 2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_cpu_backends(benchmark, data_dir, backend):
    benchmark.group = f"data: decode + crop {SIZE} + flip + normalize, {WORKERS} workers"
    _run(benchmark, data_dir, "torch" if backend == "torch" else "dali-cpu", backend, "cpu")


def test_verify_scan(benchmark, data_dir):
    """verify.scan's header + end-marker check over the sample set (`python -m dataloading.verify` without --full)."""
    from dataloading import open_source
    from dataloading.verify import scan

    source = open_source(data_dir)
    benchmark.group = "data: verify scan"
    bad = benchmark.pedantic(scan, args=(source,), rounds=3, iterations=1)
    assert bad == {}
    if benchmark.stats is None:  # --benchmark-disable
        return
    benchmark.extra_info.update(files=len(source), files_per_s=round(len(source) / benchmark.stats.stats.median))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_dali
def test_gpu_dali(benchmark, data_dir):
    benchmark.group = "data on GPU: decode + crop + normalize"
    _run(benchmark, data_dir, "dali-gpu", "dali", "gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_torchvision_decode_jpeg(benchmark, data_dir):
    """Baseline: torchvision.io.decode_jpeg(device="cuda") on whole batches, then resize + normalize on GPU (no crop)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from dataloading import open_source
    from dataloading.datasets import IMAGENET_MEAN

    names = open_source(data_dir).names
    encoded = [read_file(n) for n in names]
    mean = torch.tensor(IMAGENET_MEAN, device="cuda")[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD, device="cuda")[:, None, None] * 255

    def epoch():
        for start in range(0, len(encoded) - MICRO + 1, MICRO):
            images = decode_jpeg(encoded[start : start + MICRO], device="cuda", mode=ImageReadMode.RGB)
            batch = torch.stack([F.interpolate(img[None].float(), size=(SIZE, SIZE), mode="bicubic",
                                               antialias=True)[0] for img in images])  # (B, 3, S, S)
            batch = (batch - mean) / std
        torch.cuda.synchronize()
        return batch

    epoch()  # warm-up: nvJPEG handles
    benchmark.group = "data on GPU: decode + crop + normalize"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    n = len(encoded) // MICRO * MICRO
    benchmark.extra_info.update(backend="torchvision.io.decode_jpeg(cuda)", device=torch.cuda.get_device_name(),
                                img_per_s=round(n / benchmark.stats.stats.median, 1))
