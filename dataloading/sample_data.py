"""The bundled sample data set: real JPEGs cut from the photographs that ship offline.

scikit-image and scikit-learn bundle a few dozen real photographs inside their wheels.
`sample_dataset_dir()` turns them, once, into an ImageFolder tree of JPEG files
(root/<photo name>/<nnnnn>.jpg), each a random crop of one photograph, so the whole
data path (file listing, JPEG decode, augmentation, sharding) runs on real files with
no download. Images are 3-channel or grayscale (the gray photographs stay gray, as some
ImageNet JPEGs are), 160-256 px on the short side.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# Photographs among skimage.data's bundled files (no pooch/network needed). Synthetic
# images (checkerboard, binary_blobs, logo, ...) and near-duplicates (cat == chelsea) are
# left out; names missing from an installed version are skipped.
_SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
    "rocket", "text",
)
# Bump when the recipe below changes, so old caches are not mistaken for new ones.
_VERSION = "sample_images_v1"
# Written last inside the temp dir: its presence means the tree is complete. It also
# serves as a ready-made file list ("relative/path.jpg label" per line).
_MANIFEST = "files.txt"


def _load_photos() -> dict[str, np.ndarray]:
    """Return {name: uint8 array (H, W, 3) or (H, W)} of the bundled photographs."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            photos[name] = np.asarray(loader())
        except Exception:  # some versions fetch a file through pooch: never download
            continue
    sklearn_images = load_sample_images()
    for path, image in zip(sklearn_images.filenames, sklearn_images.images):
        photos[Path(path).stem] = np.asarray(image)
    return photos


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop 30-100% of each side at a random place, resize to 160-256 px short side, maybe flip."""
    width, height = photo.size
    crop_w = int(width * rng.uniform(0.3, 1.0))
    crop_h = int(height * rng.uniform(0.3, 1.0))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    short = int(rng.integers(160, 257))
    scale = short / min(crop_w, crop_h)
    crop = crop.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def _build(out_dir: Path, num_images: int, seed: int) -> None:
    """Write num_images JPEGs into out_dir/<photo>/, classes round-robin, then the manifest."""
    photos = {name: Image.fromarray(array) for name, array in sorted(_load_photos().items())}
    names = list(photos)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_images):
        label = i % len(names)  # round-robin keeps the classes balanced
        name = names[label]
        (out_dir / name).mkdir(exist_ok=True)
        rel = f"{name}/{i:05d}.jpg"
        _random_crop(photos[name], rng).save(out_dir / rel, format="JPEG", quality=90)
        lines.append(f"{rel} {label}\n")
    (out_dir / _MANIFEST).write_text("".join(lines))


def sample_dataset_dir(cache_dir: str | os.PathLike | None = None, num_images: int = 256, seed: int = 0) -> Path:
    """Return the root of the sample ImageFolder tree, building it on first use.

    The tree lives in `<cache_dir>/sample_images_v1-n<num_images>-seed<seed>`; cache_dir
    defaults to $IMG2VEC_CACHE, else ~/.cache/img2vec. The same (num_images, seed) always
    gives the same files. Safe to call from several processes at once: each builds into its
    own temp dir and renames it into place; the first rename wins, the others discard theirs.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    final = cache_root(cache_dir) / f"{_VERSION}-n{num_images}-seed{seed}"
    return build_once(final, lambda tmp: _build(tmp, num_images, seed), "sample set")


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """cache_dir, else $IMG2VEC_CACHE, else ~/.cache/img2vec."""
    return Path(cache_dir or os.environ.get("IMG2VEC_CACHE") or Path.home() / ".cache" / "img2vec")


def build_once(final: Path, build, what: str) -> Path:
    """Build a cached data set at `final` exactly once, safely across processes.

    `build(tmp)` fills a private temp dir and writes files.txt last; the temp dir is then
    renamed into place (atomic on one file system). The first rename wins; the others
    discard their copy.
    """
    if (final / _MANIFEST).is_file():
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but is not a complete {what} (no {_MANIFEST}); delete it and retry")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)  # atomic on one file system; fails if another process got there first
        except OSError:
            if not (final / _MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
