"""Image data set for MIM pretraining, with per-sample seeded augmentation.

`ImageDataset(path, image_size)` reads any data set `sources.open_source` accepts (an
ImageFolder tree, a file list, WebDataset tar shards), decodes with PIL to RGB and applies
the MAE pretraining augmentation: RandomResizedCrop(image_size, scale=(0.2, 1.0),
ratio=(3/4, 4/3), bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize(ImageNet
mean/std). With augment=False the crop is the central square and there is no flip.

dataset[i] returns (image, index): image (3, H, W) float32 with H = W = image_size, and
the index of the file actually decoded (it differs from i only if file i was unreadable:
the next readable file takes its place, with the crop that sample i would have had).

The random draws of sample i come from a generator seeded by (seed, epoch, i) alone, not
from worker ids or ranks, so the same sample gets the same crop however the data set is
split across workers and processes: resume and world-size changes reproduce batches exactly.
`augment_params` is that draw; the DALI backend (dali.py) uses it too, so both backends crop
the same boxes.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from .sources import DEFAULT_MAX_IMAGE_PIXELS, BadImage, DataError, Source, check_image, decode_rgb, escape_name, open_source

log = logging.getLogger("img2vec.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.2, 1.0)  # RandomResizedCrop area fraction (MAE pretraining)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio w / h

# Tags keep the seed streams of different uses apart (SeedSequence treats [a, b] and
# [a, b, 0] alike, so a bare key tuple could collide with a longer one).
AUGMENT_STREAM = 0
PERMUTATION_STREAM = 1

Skip = tuple[str, str]  # (name of the file, reason it was skipped)


def derive_seed(*keys: int) -> int:
    """Hash non-negative integer keys to a 64-bit seed for torch.Generator.manual_seed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Draw (top, left, h, w) like torchvision's RandomResizedCrop.get_params, from `generator`.

    Ten tries at a box of random area fraction (scale) and log-uniform aspect ratio (ratio);
    if none fits inside the image, the largest center crop whose ratio is within bounds.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_params(
    height: int,
    width: int,
    seed: int,
    epoch: int,
    index: int,
    augment: bool = True,
    scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) for sample `index` of `epoch`: a function of its arguments only."""
    if not augment:  # evaluation view: the central square, unflipped
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side, False
    generator = torch.Generator().manual_seed(derive_seed(AUGMENT_STREAM, seed, epoch, index))
    top, left, h, w = sample_crop(height, width, scale, ratio, generator)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return top, left, h, w, flip


class SkipLog:
    """Files skipped so far, each logged once (WARNING, logger img2vec.data) with its reason."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, skips: list[Skip]) -> None:
        for name, reason in skips:
            if name not in self._reasons:
                self._reasons[name] = reason
                log.warning("skipping unreadable image %s: %s", escape_name(name), reason)

    def items(self) -> list[Skip]:
        return list(self._reasons.items())


class ImageDataset(Dataset):
    """Images from any data set `open_source` accepts, MAE-augmented, seeded per (seed, epoch, index).

    path: a directory laid out root/<class>/<image> (jpg, jpeg, png, bmp, webp, any case),
    a text file with one 'path [label]' per line, .tar shards, or an opened `Source`.
    `labels[i]` is the class of image i (-1 when unknown). A file that cannot be used
    (check_image or the decode fails) is replaced by the next usable one; `num_skipped`
    counts these (per process: each loader worker keeps its own count) and the loader
    collects their names (`load`) and logs each once. Images above `max_image_pixels`
    (height * width, 0 = no cap) are skipped before they are decoded.
    """

    def __init__(
        self,
        path: str | os.PathLike | Source,
        image_size: int,
        seed: int = 0,
        scale: tuple[float, float] = SCALE,
        ratio: tuple[float, float] = RATIO,
        augment: bool = True,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = path if isinstance(path, Source) else open_source(path)
        self.labels = self.source.labels
        self.image_size = image_size
        self.seed = seed
        self.scale = scale
        self.ratio = ratio
        self.augment = augment
        self.max_image_pixels = max_image_pixels
        self.epoch = 0
        self.num_skipped = 0
        self._bad: dict[int, str] = {}  # files found unusable in this process

    @property
    def paths(self) -> list[str]:
        """Display name of every sample: its path, or 'shard.tar:member'."""
        return self.source.names

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations __getitem__ draws."""
        self.epoch = epoch

    def _decode(self, index: int) -> Image.Image:
        """Decode file `index` to RGB; raise BadImage with the reason if it cannot be used."""
        if index in self._bad:
            raise BadImage(self._bad[index])
        try:
            data = self.source.read(index)
            check_image(data, self.max_image_pixels)  # the same cheap test the DALI backend runs, so both skip the same files
            return decode_rgb(data)
        except (BadImage, OSError) as err:
            self._bad[index] = str(err)
            self.num_skipped += 1
            raise BadImage(str(err)) from None

    def load_image(self, index: int) -> tuple[Image.Image, int, list[Skip]]:
        """(RGB image, index of the file decoded, files skipped on the way): file `index`, else the next usable one.

        The decode step of `load` without the augmentation, for a caller with its own transform.
        """
        skipped: list[Skip] = []
        for offset in range(len(self)):
            source = (index + offset) % len(self)  # deterministic substitute: the next file
            try:
                return self._decode(source), source, skipped
            except BadImage as err:
                log.debug("skipping %s: %s", self.source.names[source], err)
                skipped.append((self.source.names[source], str(err)))
        raise DataError(f"none of the {len(self)} images could be decoded; "
                        "run python -m dataloading.verify --full on the data")

    def load(self, index: int) -> tuple[torch.Tensor, int, list[Skip]]:
        """(image (3, H, W) float32 normalized, index of the file decoded, files skipped on the way)."""
        image, source, skipped = self.load_image(index)
        # Seeded by the requested index, so a substitute gets the crop the missing sample would have.
        top, left, h, w, flip = augment_params(image.height, image.width, self.seed, self.epoch, index,
                                               self.augment, self.scale, self.ratio)
        image = TF.resized_crop(image, top, left, h, w, [self.image_size, self.image_size], InterpolationMode.BICUBIC)
        if flip:
            image = TF.hflip(image)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)  # (3, H, W)
        return tensor, source, skipped

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return (image (3, H, W) float32 normalized, index of the file decoded)."""
        tensor, source, _ = self.load(index)
        return tensor, source
