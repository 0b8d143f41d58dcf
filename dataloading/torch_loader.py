"""The torchvision backend: one rank's batches from DataLoader workers decoding with PIL.

Batches are {"images": (B, 3, H, W) on the CPU, "index": (B,) int64}; the sampler and the
per-sample seeded augmentation make them independent of the number of workers and ranks.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .base import DTYPES, Batch, BaseLoader, GlobalBatchSampler, LoaderSpec
from .datasets import ImageDataset, Skip
from .sources import DataError


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
    """Batches of ImageDataset samples in GlobalBatchSampler order.

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
        try:
            for batch in batches:
                self._skips.add(batch.pop("skipped"))
                if self._dtype != torch.float32:
                    batch["images"] = batch["images"].to(self._dtype)
                yield batch
        except DataError as err:
            # A worker's DataError comes back with the worker's traceback in its message: keep the one line.
            raise DataError(str(err).strip().splitlines()[-1].removeprefix("dataloading.sources.DataError: ")) from None
