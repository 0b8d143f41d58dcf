"""`build_loader(spec)`: the one entry point, and the only place that chooses the data backend.

Batches are dicts {"images": (B, 3, H, W), "index": (B,) int64}, B = micro_batch; images
are float32 unless spec.dtype says otherwise, on the CPU for the torch backend and for DALI's
CPU pipeline, on the GPU for DALI's GPU pipeline. Both backends read the same global batches
(base.GlobalBatchSampler) and crop the same boxes (datasets.augment_params), so resume and
world-size invariance hold on either; pixels differ only by decoder and resampler rounding.

Unusable files are skipped on every backend, logged once each (logger "img2vec.data"),
and listed by `loader.skipped_files()`. What cannot start a run at all (no images, fewer
than one global batch, every file unusable, a bad setting) raises `DataError`, one line.
"""
from __future__ import annotations

import logging

import torch

from .base import BaseLoader, LoaderSpec
from .dali import DaliLoader, dali_import_error
from .datasets import ImageDataset
from .sample_data import sample_dataset_dir
from .sources import BadImage, DataError, Source, check_image, open_source
from .torch_loader import ImageLoader

log = logging.getLogger("img2vec.data")


def _first_usable(source: Source, max_image_pixels: int) -> None:
    """Raise DataError (one line) at start-up if no file of the data set passes check_image."""
    first_reason = None
    for i in range(len(source)):
        try:
            check_image(source.read(i), max_image_pixels)
            return
        except (BadImage, OSError) as err:
            first_reason = first_reason or f"{source.names[i]!r}: {err}"
    raise DataError(f"none of the {len(source)} files of the data set is a usable image (first: {first_reason}); "
                    "run python -m dataloading.verify on it")


def resolve_backend(spec: LoaderSpec) -> tuple[str, str]:
    """(backend, dali_device) that will run for `spec`; a named backend that cannot run raises one line.

    auto: DALI whenever it imports (its GPU pipeline when CUDA is available, else its CPU
    pipeline, which bench/test_bench_data.py measures at 1.6-2x the torchvision loader's
    images/s on 2 CPU cores), else torch; if the DALI pipeline then fails to start, torch.
    """
    want_gpu = spec.dali_device == "gpu" or (spec.dali_device == "auto" and torch.cuda.is_available())
    device = "gpu" if want_gpu else "cpu"
    if spec.backend == "torch":
        return "torch", device
    error = dali_import_error()
    if spec.backend == "dali":
        if error:
            raise DataError(f"data_backend='dali' needs NVIDIA DALI ({error}); install nvidia-dali-cuda130 "
                            "or use data_backend=torch")
        if device == "gpu" and not torch.cuda.is_available():
            raise DataError("dali_device='gpu' needs a CUDA device and none is visible; use dali_device=cpu or auto")
        return "dali", device
    return ("torch", device) if error else ("dali", device)


def build_loader(spec: LoaderSpec) -> BaseLoader:
    """Build this rank's loader for `spec`; what the user can fix raises DataError with one line."""
    spec.validate()
    backend, device = resolve_backend(spec)
    source = open_source(spec.data_path or sample_dataset_dir())
    for note in source.notes:
        log.info("%s", note)
    for lost in source.lost:
        log.warning("%s", lost)
    global_batch = spec.micro_batch * spec.world_size
    if spec.drop_last and len(source) < global_batch:
        raise DataError(
            f"data set has {len(source)} images, fewer than one global batch "
            f"(micro_batch {spec.micro_batch} x world_size {spec.world_size} = {global_batch}); "
            "use a smaller micro-batch (--batch_size, or the DeepSpeed JSON's train_micro_batch_size_per_gpu) "
            "or more images"
        )
    _first_usable(source, spec.max_image_pixels)
    if backend == "dali":
        try:
            loader = DaliLoader(source, spec, device)
        except Exception as err:
            if spec.backend == "dali" or isinstance(err, ValueError):  # ValueError: the data, not DALI
                raise
            log.warning("data_backend=auto: DALI failed to start (%s: %s); using the torch loader",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            backend = "torch"
    if backend == "torch":
        dataset = ImageDataset(source, spec.image_size, seed=spec.seed, augment=spec.augment,
                               max_image_pixels=spec.max_image_pixels)
        loader = ImageLoader(dataset, spec)
    log.info("data_backend=%s -> %s loader: %d images (%s), %d steps/epoch of %d x %d", spec.backend,
             loader.backend, len(source), source.kind, loader.steps_per_epoch, spec.world_size, spec.micro_batch)
    return loader
