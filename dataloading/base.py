"""What every data backend shares: the spec, the global-batch sampler, the batch type, the loader interface.

Both backends (torch_loader.py, dali.py) import this module and nothing of each other;
only `loader.build_loader` chooses between them.

Sharding is defined on the global batch, so what the model sees does not depend on the
number of processes: for epoch e, perm = randperm(len(dataset)) seeded by (seed, e);
global batch s = perm[s*G:(s+1)*G] with G = micro_batch * world_size, and rank r takes
its contiguous slice [r*micro_batch:(r+1)*micro_batch]. Together with the per-sample
seeded augmentation (datasets.augment_params), 2 ranks x micro 4 see exactly the samples
and boxes of 1 rank x micro 8, and `iter_from(epoch, step)` resumes a run batch for batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from .datasets import PERMUTATION_STREAM, Skip, SkipLog, derive_seed
from .sources import DEFAULT_MAX_IMAGE_PIXELS, DataError, Source

Batch = dict[str, torch.Tensor]  # {"images": (B, 3, H, W), "index": (B,) int64}
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
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100), GPU pipeline only
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # images larger (h * w, from the header) are skipped; 0 = no cap

    def validate(self) -> None:
        """Raise DataError (one line) for the first bad field."""
        checks = [
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}"),
            (0 <= self.rank < self.world_size, f"rank must be in [0, world_size={self.world_size}), got {self.rank}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.prefetch >= 1, f"prefetch must be >= 1, got {self.prefetch}"),
            (0.0 <= self.hw_decoder_load <= 1.0, f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}"),
            (self.max_image_pixels >= 0, f"max_image_pixels must be >= 0 (0: no cap), got {self.max_image_pixels}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        for name, value, choices in (
            ("data_backend", self.backend, ("auto", "torch", "dali")),
            ("dtype", self.dtype, tuple(DTYPES)),
            ("dali_device", self.dali_device, ("auto", "gpu", "cpu")),
        ):
            if value not in choices:
                raise DataError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
