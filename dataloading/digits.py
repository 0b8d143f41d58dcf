"""The labeled embedded data set: scikit-learn's handwritten digits as an ImageFolder train/val split.

scikit-learn ships 1797 real 8x8 grayscale digits (10 classes, values 0..16) inside its
wheel. `digits_dataset_dir()` writes them, once, as PNG files upscaled to `image_size`
(bicubic, white strokes on black):

    <cache>/digits_v1-s<image_size>-val<val_fraction>-seed<seed>/
        train/<0..9>/<nnnn>.png     stratified split, the same files for the same arguments
        val/<0..9>/<nnnn>.png
        files.txt                   written last: the tree is complete

`nnnn` is the index in sklearn's array, so a file can be traced back to its source. The
split is stratified per class with a fixed seed: every class is in both halves in the
proportion of the whole.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .sample_data import _MANIFEST, build_once, cache_root

_VERSION = "digits_v1"  # bump when the recipe below changes


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (n,) mask of validation samples: round(val_fraction * n_c) per class c."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        is_val[rng.permutation(idx)[: int(round(val_fraction * len(idx)))]] = True
    return is_val


def _build(out_dir: Path, image_size: int, val_fraction: float, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()  # images (1797, 8, 8) float in 0..16, target (1797,)
    is_val = _split(digits.target, val_fraction, seed)
    lines = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if is_val[i] else "train"
        folder = out_dir / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # (8, 8)
        big = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC)
        rel = f"{split}/{label}/{i:04d}.png"
        big.save(out_dir / rel)
        lines.append(f"{rel} {label}\n")
    (out_dir / _MANIFEST).write_text("".join(lines))


def digits_dataset_dir(cache_dir: str | os.PathLike | None = None, image_size: int = 32,
                       val_fraction: float = 0.25, seed: int = 0) -> Path:
    """Return the root of the digits tree (with train/ and val/ ImageFolders), building it once.

    cache_dir defaults to $IMG2VEC_CACHE, else ~/.cache/img2vec. Safe to call from several
    processes at once: each builds into its own temp dir; the first rename wins.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    final = cache_root(cache_dir) / f"{_VERSION}-s{image_size}-val{val_fraction:g}-seed{seed}"
    return build_once(final, lambda tmp: _build(tmp, image_size, val_fraction, seed), "digits set")


def main(argv: list[str] | None = None) -> int:
    """python -m dataloading.digits: build the digits tree (once) and print its root."""
    parser = argparse.ArgumentParser(prog="python -m dataloading.digits", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Write scikit-learn's digits as an ImageFolder train/val tree "
                                                 "(once) and print its root.")
    parser.add_argument("--output_dir", "--output-dir", default=None,
                        help="cache folder to build under; unset: $IMG2VEC_CACHE, else ~/.cache/img2vec")
    parser.add_argument("--image_size", "--image-size", type=int, default=32, help="side of each PNG, >= 8")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=0.25, help="share of each class in val/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = parser.parse_args(argv)
    try:
        root = digits_dataset_dir(args.output_dir, args.image_size, args.val_fraction, args.seed)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
