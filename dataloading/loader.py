"""`build_loader(spec)`: the one entry point that hides which data backend runs.

Batches are dicts {"images": (B, 3, H, W) float32, "index": (B,) int64}, B = micro_batch.

Sharding is defined on the global batch, so what the model sees does not depend on the
number of processes: for epoch e, perm = randperm(len(dataset)) seeded by (seed, e);
global batch s = perm[s*G:(s+1)*G] with G = micro_batch * world_size, and rank r takes
its contiguous slice [r*micro_batch:(r+1)*micro_batch]. Together with the per-sample
seeded augmentation of ImageDataset, 2 ranks x micro 4 see exactly the samples and pixels
of 1 rank x micro 8, and `iter_from(epoch, step)` resumes a run batch for batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .datasets import PERMUTATION_STREAM, ImageDataset, derive_seed
from .sample_data import sample_dataset_dir

log = logging.getLogger("img2vec.data")

Batch = dict[str, torch.Tensor]


@dataclass
class LoaderSpec:
    """What one rank's loader needs; plain values so dataloading/ stays independent of the config."""

    data_path: str  # ImageFolder root or file list; "" = the bundled sample set
    image_size: int  # square crop side H = W
    micro_batch: int  # images per rank per step
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 2
    shuffle: bool = True  # a new permutation every epoch
    drop_last: bool = True  # drop the incomplete last global batch; else pad it by wrapping around
    backend: str = "auto"  # "auto" | "torch" | "dali"
    pin_memory: bool = False

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
        if self.backend not in ("auto", "torch", "dali"):
            raise ValueError(f"data_backend must be 'auto', 'torch' or 'dali', got {self.backend!r}")


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


def _collate(samples: list[tuple[torch.Tensor, int]]) -> Batch:
    images, indices = zip(*samples)
    return {"images": torch.stack(images), "index": torch.tensor(indices, dtype=torch.long)}


class ImageLoader:
    """One rank's batches: iterate for an epoch, or `iter_from(epoch, step)` to resume mid-epoch.

    Each iteration starts fresh workers (persistent_workers=False) so they copy the
    dataset with the current epoch set.
    """

    def __init__(self, dataset: ImageDataset, spec: LoaderSpec) -> None:
        self.dataset = dataset
        self.spec = spec
        self.sampler = GlobalBatchSampler(len(dataset), spec)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.epoch = 0
        self._loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=spec.num_workers,
            collate_fn=_collate,
            pin_memory=spec.pin_memory,
            persistent_workers=False,
        )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (permutation and augmentations) that the next iteration runs."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, step_in_epoch: int) -> Iterator[Batch]:
        """Yield batches step_in_epoch .. steps_per_epoch-1 of `epoch`, identical to a full pass's tail."""
        if not 0 <= step_in_epoch <= self.steps_per_epoch:
            raise ValueError(f"step_in_epoch must be in [0, {self.steps_per_epoch}], got {step_in_epoch}")
        self.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.sampler.epoch = epoch
        self.sampler.start_step = step_in_epoch
        return iter(self._loader)


def build_loader(spec: LoaderSpec) -> ImageLoader:
    """Build this rank's loader for `spec`; errors a user can hit are one line each."""
    spec.validate()
    if spec.backend == "dali":
        raise NotImplementedError("data_backend='dali' is not implemented yet; use 'torch' or 'auto'")
    if spec.backend == "auto":
        log.info("data_backend=auto -> torch (torchvision loader; the DALI path is not implemented yet)")
    dataset = ImageDataset(spec.data_path or sample_dataset_dir(), spec.image_size, seed=spec.seed)
    global_batch = spec.micro_batch * spec.world_size
    if spec.drop_last and len(dataset) < global_batch:
        raise ValueError(
            f"data set has {len(dataset)} images, fewer than one global batch "
            f"(micro_batch {spec.micro_batch} x world_size {spec.world_size} = {global_batch}); "
            "use a smaller micro_batch or more images"
        )
    return ImageLoader(dataset, spec)
