"""`build_loader(spec)`: the one entry point that hides which data backend runs.

Batches are dicts {"images": (B, 3, H, W), "index": (B,) int64}, B = micro_batch; images
are float32 unless spec.dtype says otherwise, on the CPU for the torch backend and for DALI's
CPU pipeline, on the GPU for DALI's GPU pipeline.

Sharding is defined on the global batch, so what the model sees does not depend on the
number of processes: for epoch e, perm = randperm(len(dataset)) seeded by (seed, e);
global batch s = perm[s*G:(s+1)*G] with G = micro_batch * world_size, and rank r takes
its contiguous slice [r*micro_batch:(r+1)*micro_batch]. Together with the per-sample
seeded augmentation of ImageDataset, 2 ranks x micro 4 see exactly the samples and pixels
of 1 rank x micro 8, and `iter_from(epoch, step)` resumes a run batch for batch. The DALI
backend's default source ("sampler") reads the same batches and crops the same boxes
(pixels agree within decoder tolerance); its "reader" source uses DALI's own readers and
shuffling instead (see dali.py for what that keeps and what it gives up).

Unusable files are skipped on every backend, logged once each (logger "img2vec.data"),
and listed by `loader.skipped_files()`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .datasets import PERMUTATION_STREAM, ImageDataset, Skip, SkipLog, derive_seed
from .sample_data import sample_dataset_dir
from .sources import BadImage, Source, check_image, open_source

log = logging.getLogger("img2vec.data")

Batch = dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoaderSpec:
    """What one rank's loader needs; plain values so dataloading/ stays independent of the config."""

    data_path: str  # ImageFolder root, file list, or .tar shards (file, glob, folder); "" = the bundled sample set
    image_size: int  # square crop side H = W
    micro_batch: int  # images per rank per step
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 2  # torch: DataLoader worker processes; DALI: CPU threads (at least 1)
    shuffle: bool = True  # a new permutation every epoch
    drop_last: bool = True  # drop the incomplete last global batch; else pad it by wrapping around
    backend: str = "auto"  # "auto" | "torch" | "dali"
    pin_memory: bool = False
    augment: bool = True  # False: central square crop, no flip (evaluation view, parity tests)
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16": dtype of batch["images"]
    prefetch: int = 2  # batches prepared ahead (DALI prefetch_queue_depth, torch prefetch_factor)
    dali_device: str = "auto"  # "auto" (gpu when CUDA is available) | "gpu" (decoders device="mixed") | "cpu"
    dali_source: str = "sampler"  # "sampler": our global-batch sampler feeds DALI | "reader": DALI's own readers
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100), GPU pipeline only

    def validate(self) -> None:
        """Raise ValueError with one line per bad field."""
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        for name, value, choices in (
            ("data_backend", self.backend, ("auto", "torch", "dali")),
            ("dtype", self.dtype, tuple(DTYPES)),
            ("dali_device", self.dali_device, ("auto", "gpu", "cpu")),
            ("dali_source", self.dali_source, ("sampler", "reader")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of each global batch of one epoch, starting at `start_step`.

    `epoch` and `start_step` are read when iteration starts (the DataLoader calls iter() on
    construction of its iterator), so changing them later does not disturb a running epoch.
    """

    def __init__(self, num_samples: int, spec: LoaderSpec) -> None:
        self.num_samples = num_samples
        self.micro_batch = spec.micro_batch
        self.rank = spec.rank
        self.global_batch = spec.micro_batch * spec.world_size
        self.seed = spec.seed
        self.shuffle = spec.shuffle
        divide = math.floor if spec.drop_last else math.ceil
        self.steps_per_epoch = divide(num_samples / self.global_batch)
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(PERMUTATION_STREAM, self.seed, self.epoch))
            perm = torch.randperm(self.num_samples, generator=generator)
        else:
            perm = torch.arange(self.num_samples)
        needed = self.steps_per_epoch * self.global_batch
        if needed > self.num_samples:  # drop_last=False: pad the last global batch from the start
            perm = perm.repeat(math.ceil(needed / self.num_samples))
        G, mb, r = self.global_batch, self.micro_batch, self.rank
        batches = perm[self.start_step * G : needed].view(-1, G)[:, r * mb : (r + 1) * mb]  # (steps, mb)
        return iter(batches.tolist())


class BaseLoader:
    """What every backend offers the trainer: steps_per_epoch, set_epoch, iteration, iter_from, skips.

    Subclasses set `source`, `spec`, `steps_per_epoch`, `backend` and implement `iter_from`.
    """

    source: Source
    spec: LoaderSpec
    steps_per_epoch: int
    backend: str  # "torch" | "dali-cpu" | "dali-gpu", for the log

    def __init__(self) -> None:
        self.epoch = 0
        self._skips = SkipLog()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (permutation and augmentations) that the next iteration runs."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, step_in_epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def skipped_files(self) -> list[Skip]:
        """(name, reason) of every file this rank has skipped so far, each once."""
        return self._skips.items()

    def _check_step(self, step_in_epoch: int) -> None:
        if not 0 <= step_in_epoch <= self.steps_per_epoch:
            raise ValueError(f"step_in_epoch must be in [0, {self.steps_per_epoch}], got {step_in_epoch}")


class _SkipReporting(torch.utils.data.Dataset):
    """ImageDataset as the DataLoader sees it: samples carry the files skipped while loading them.

    DataLoader workers are separate processes; the skips travel back inside the batch.
    """

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, list[Skip]]:
        return self.dataset.load(index)


def _collate(samples: list[tuple[torch.Tensor, int, list[Skip]]]) -> dict:
    images, indices, skipped = zip(*samples)
    return {"images": torch.stack(images), "index": torch.tensor(indices, dtype=torch.long),
            "skipped": [skip for per_sample in skipped for skip in per_sample]}


class ImageLoader(BaseLoader):
    """The torchvision backend: one rank's batches from DataLoader workers decoding with PIL.

    Each iteration starts fresh workers (persistent_workers=False) so they copy the
    dataset with the current epoch set.
    """

    backend = "torch"

    def __init__(self, dataset: ImageDataset, spec: LoaderSpec) -> None:
        super().__init__()
        self.dataset = dataset
        self.source = dataset.source
        self.spec = spec
        self.sampler = GlobalBatchSampler(len(dataset), spec)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self._dtype = DTYPES[spec.dtype]
        self._loader = DataLoader(
            _SkipReporting(dataset),
            batch_sampler=self.sampler,
            num_workers=spec.num_workers,
            collate_fn=_collate,
            pin_memory=spec.pin_memory,
            persistent_workers=False,
            prefetch_factor=spec.prefetch if spec.num_workers else None,
        )

    def iter_from(self, epoch: int, step_in_epoch: int) -> Iterator[Batch]:
        """Yield batches step_in_epoch .. steps_per_epoch-1 of `epoch`, identical to a full pass's tail."""
        self._check_step(step_in_epoch)
        self.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.sampler.epoch = epoch
        self.sampler.start_step = step_in_epoch
        return self._batches(iter(self._loader))

    def _batches(self, batches: Iterator[dict]) -> Iterator[Batch]:
        for batch in batches:
            self._skips.add(batch.pop("skipped"))
            if self._dtype != torch.float32:
                batch["images"] = batch["images"].to(self._dtype)
            yield batch


def _first_usable(source: Source) -> None:
    """Raise ValueError (one line) at start-up if no file of the data set passes check_image."""
    first_reason = None
    for i in range(len(source)):
        try:
            check_image(source.read(i))
            return
        except (BadImage, OSError) as err:
            first_reason = first_reason or f"{source.names[i]}: {err}"
    raise ValueError(f"none of the {len(source)} files of the data set is a usable image (first: {first_reason}); "
                     "run python -m dataloading.verify on it")


def resolve_backend(spec: LoaderSpec) -> tuple[str, str]:
    """(backend, dali_device) that will run for `spec`; a named backend that cannot run raises one line.

    auto: DALI whenever it imports (its GPU pipeline when CUDA is available, else its CPU
    pipeline, which bench/test_bench_data.py measures at 1.6-2x the torchvision loader's
    images/s on 2 CPU cores), else torch; if the DALI pipeline then fails to start, torch.
    """
    from .dali import dali_import_error

    want_gpu = spec.dali_device == "gpu" or (spec.dali_device == "auto" and torch.cuda.is_available())
    device = "gpu" if want_gpu else "cpu"
    if spec.backend == "torch":
        return "torch", device
    error = dali_import_error()
    if spec.backend == "dali":
        if error:
            raise RuntimeError(f"data_backend='dali' needs NVIDIA DALI ({error}); install nvidia-dali-cuda130 "
                               "or use data_backend=torch")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("dali_device='gpu' needs a CUDA device and none is visible; use dali_device=cpu or auto")
        return "dali", device
    return ("torch", device) if error else ("dali", device)


def build_loader(spec: LoaderSpec) -> BaseLoader:
    """Build this rank's loader for `spec`; errors a user can hit are one line each."""
    spec.validate()
    backend, device = resolve_backend(spec)
    source = open_source(spec.data_path or sample_dataset_dir())
    for note in source.notes:
        log.info("%s", note)
    global_batch = spec.micro_batch * spec.world_size
    if spec.drop_last and len(source) < global_batch:
        raise ValueError(
            f"data set has {len(source)} images, fewer than one global batch "
            f"(micro_batch {spec.micro_batch} x world_size {spec.world_size} = {global_batch}); "
            "use a smaller micro_batch or more images"
        )
    _first_usable(source)
    if backend == "dali":
        from .dali import DaliLoader

        try:
            loader = DaliLoader(source, spec, device)
        except Exception as err:
            if spec.backend == "dali" or isinstance(err, ValueError):  # ValueError: the data, not DALI
                raise
            log.warning("data_backend=auto: DALI failed to start (%s: %s); using the torch loader",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            backend = "torch"
    if backend == "torch":
        loader = ImageLoader(ImageDataset(source, spec.image_size, seed=spec.seed, augment=spec.augment), spec)
    log.info("data_backend=%s -> %s loader%s: %d images (%s), %d steps/epoch of %d x %d", spec.backend,
             loader.backend, f" ({spec.dali_source})" if backend == "dali" else "", len(source), source.kind,
             loader.steps_per_epoch, spec.world_size, spec.micro_batch)
    return loader
