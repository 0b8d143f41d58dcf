"""Image data set for MIM pretraining, with per-sample seeded augmentation.

`ImageDataset(path, image_size)` reads an ImageFolder tree (root/<class>/<image>) or a
text file list, decodes with PIL to RGB and applies the MAE pretraining augmentation:
RandomResizedCrop(image_size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) ->
RandomHorizontalFlip -> ToTensor -> Normalize(ImageNet mean/std).

dataset[i] returns (image, index): image (3, H, W) float32 with H = W = image_size, and
the index of the file actually decoded (it differs from i only if file i was unreadable).

The random draws of sample i come from a generator seeded by (seed, epoch, i) alone, not
from worker ids or ranks, so the same sample gets the same crop however the data set is
split across workers and processes: resume and world-size changes reproduce batches exactly.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

log = logging.getLogger("img2vec.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tags keep the seed streams of different uses apart (SeedSequence treats [a, b] and
# [a, b, 0] alike, so a bare key tuple could collide with a longer one).
AUGMENT_STREAM = 0
PERMUTATION_STREAM = 1


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, CMYK, RGBA, P, ...) to RGB."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image.convert("RGB")


def _scan_folder(root: Path) -> tuple[list[Path], list[int]]:
    """List images under root/<class>/ (any depth below the class folder), sorted; label = class order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()  # os.walk order is file-system dependent; sorting makes indices stable
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(Path(dirpath) / filename)
                    labels.append(label)
    return paths, labels


def _read_list(list_file: Path) -> tuple[list[Path], list[int]]:
    """Read 'path [label]' lines; relative paths are resolved against the list file's folder."""
    paths: list[Path] = []
    labels: list[int] = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise ValueError(
                f"{list_file}:{line_no}: expected 'path [integer label]', got {line!r}; "
                "paths containing spaces are not supported"
            )
        paths.append(list_file.parent / fields[0])  # an absolute fields[0] replaces the parent
        labels.append(int(fields[1]) if len(fields) == 2 else -1)
    return paths, labels


class ImageDataset(Dataset):
    """Images from an ImageFolder tree or a file list, MAE-augmented, seeded per (seed, epoch, index).

    path: a directory laid out root/<class>/<image> (jpg, jpeg, png, bmp, webp, any case),
    or a text file with one 'path [label]' per line. `labels[i]` is the class of image i
    (-1 when a list gives none). A file that cannot be decoded is replaced by the next
    decodable one, with a warning; `num_skipped` counts these (per process: each loader
    worker keeps its own count).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        seed: int = 0,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist; pass an ImageFolder directory or a file list")
        if path.is_dir():
            self.paths, self.labels = _scan_folder(path)
            where = f"under {path}/<class>/ (expected layout root/<class>/<image>, extensions {', '.join(IMAGE_EXTENSIONS)})"
        else:
            self.paths, self.labels = _read_list(path)
            where = f"listed in {path}"
        if not self.paths:
            raise ValueError(f"no images found {where}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.image_size = image_size
        self.seed = seed
        self.scale = scale
        self.ratio = ratio
        self.epoch = 0
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations __getitem__ draws."""
        self.epoch = epoch

    def _load(self, index: int) -> Image.Image | None:
        """Decode file `index` to RGB, or return None (after a warning) if it cannot be read."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return _to_rgb(image)  # convert() forces the full decode inside the try
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
            self.num_skipped += 1
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return (image (3, H, W) float32 normalized, index of the file decoded)."""
        for offset in range(len(self.paths)):
            source = (index + offset) % len(self.paths)  # deterministic substitute: the next file
            image = self._load(source)
            if image is not None:
                break
        else:
            raise RuntimeError(f"none of the {len(self.paths)} images could be decoded; check the data set")
        # Seeded by the requested index, so a substitute gets the crop the missing sample would have.
        generator = torch.Generator().manual_seed(derive_seed(AUGMENT_STREAM, self.seed, self.epoch, index))
        top, left, h, w = sample_crop(image.height, image.width, self.scale, self.ratio, generator)
        flip = bool(torch.rand(1, generator=generator).item() < 0.5)
        image = TF.resized_crop(image, top, left, h, w, [self.image_size, self.image_size], InterpolationMode.BICUBIC)
        if flip:
            image = TF.hflip(image)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)  # (3, H, W)
        return tensor, source
