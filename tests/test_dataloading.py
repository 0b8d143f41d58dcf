"""Tests for dataloading/: sample set, ImageDataset, seeded augmentation, sharding, resume, errors."""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from dataloading import ImageDataset, LoaderSpec, build_loader, sample_dataset_dir
from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD, sample_crop

SIZE = 32


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_dataset_dir(tmp_path_factory.mktemp("cache"), num_images=40, seed=0)


def _spec(path: Path | str, **kwargs) -> LoaderSpec:
    defaults = dict(data_path=str(path), image_size=SIZE, micro_batch=8, num_workers=0, backend="torch")
    return LoaderSpec(**{**defaults, **kwargs})


def _write_image(path: Path, mode: str, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode)
    image.save(path, format="JPEG" if mode in ("L", "RGB", "CMYK") else "PNG")


# ---- sample set ----

def test_sample_set_is_real_jpegs_deterministic_and_idempotent(tmp_path: Path, sample_dir: Path) -> None:
    files = sorted(sample_dir.rglob("*.jpg"))
    assert len(files) == 40
    assert len({f.parent.name for f in files}) >= 15  # one class per bundled photograph
    for f in files[:5]:
        with Image.open(f) as image:
            assert image.format == "JPEG"
            assert min(image.size) >= 160
            image.load()
    # Same seed in another cache: byte-identical files; calling again returns the same tree untouched.
    other = sample_dataset_dir(tmp_path, num_images=40, seed=0)
    assert [f.read_bytes() for f in files] == [sample_dir.joinpath(f.relative_to(sample_dir)).read_bytes() for f in files]
    assert sorted(p.relative_to(other) for p in other.rglob("*.jpg")) == [f.relative_to(sample_dir) for f in files]
    mtime = os.path.getmtime(files[0])
    assert sample_dataset_dir(sample_dir.parent, num_images=40, seed=0) == sample_dir
    assert os.path.getmtime(files[0]) == mtime
    assert [p.name for p in tmp_path.iterdir()] == [other.name]  # no temp dirs left behind
    different = sample_dataset_dir(tmp_path, num_images=40, seed=1)
    assert different != other
    assert (different / "astronaut" / "00000.jpg").read_bytes() != (other / "astronaut" / "00000.jpg").read_bytes()


def _build_sample_set(cache_dir: Path) -> None:
    sample_dataset_dir(cache_dir, num_images=6, seed=2)


def test_sample_set_concurrent_builders(tmp_path: Path) -> None:
    """Two processes building the same set at once: one rename wins, both see a complete tree."""
    ctx = multiprocessing.get_context("fork")  # fork: the children reuse the parent's imports
    procs = [ctx.Process(target=_build_sample_set, args=(tmp_path,)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    (built,) = tmp_path.iterdir()  # the loser's temp dir is gone
    assert len(list(built.rglob("*.jpg"))) == 6
    assert sample_dataset_dir(tmp_path, num_images=6, seed=2) == built


# ---- datasets ----

def test_folder_and_file_list_datasets(tmp_path: Path, sample_dir: Path) -> None:
    folder = ImageDataset(sample_dir, SIZE)
    assert len(folder) == 40
    assert folder.labels == sorted(folder.labels)  # class folders in sorted order
    # A list with relative paths (resolved against the list's folder), an absolute path, and no label.
    lines = [f"{p.relative_to(sample_dir)} {label}" for p, label in zip(folder.paths[:3], folder.labels[:3])]
    lines.append(str(folder.paths[3]))
    list_file = sample_dir / "subset.txt"
    list_file.write_text("\n".join(lines) + "\n\n")
    listed = ImageDataset(list_file, SIZE)
    assert listed.paths == folder.paths[:4]
    assert listed.labels == folder.labels[:3] + [-1]
    torch.testing.assert_close(listed[2][0], folder[2][0], rtol=0, atol=0)
    list_file.unlink()


def test_extensions_case_insensitive_and_modes_to_rgb(tmp_path: Path) -> None:
    for name, mode in [("gray.JPG", "L"), ("cmyk.jpeg", "CMYK"), ("rgba.PNG", "RGBA"), ("palette.png", "P")]:
        _write_image(tmp_path / "cls" / name, mode)
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    dataset = ImageDataset(tmp_path, SIZE)
    assert sorted(p.name for p in dataset.paths) == ["cmyk.jpeg", "gray.JPG", "palette.png", "rgba.PNG"]
    for i in range(len(dataset)):
        image, index = dataset[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert index == i
    gray = dataset[dataset.paths.index(tmp_path / "cls" / "gray.JPG")][0]
    pixels = gray * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]  # (3, H, W) in [0, 1]
    torch.testing.assert_close(pixels[1], pixels[0])  # gray -> R = G = B
    torch.testing.assert_close(pixels[2], pixels[0])


def test_sample_crop_matches_torchvision() -> None:
    """Our generator-driven crop draws the same boxes torchvision draws from the global RNG."""
    image = Image.new("RGB", (57, 31))
    for seed in range(50):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
        got = sample_crop(31, 57, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert got == tuple(expected)
    # Fallback: an extreme aspect ratio never fits, so the center crop at the ratio bound is used.
    assert sample_crop(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)) == (0, 493, 10, 13)


def test_augmentation_depends_only_on_seed_epoch_index(sample_dir: Path) -> None:
    a, b = ImageDataset(sample_dir, SIZE, seed=3), ImageDataset(sample_dir, SIZE, seed=3)
    _ = b[7], b[1]  # draws made for other samples must not influence sample 5
    torch.testing.assert_close(a[5][0], b[5][0], rtol=0, atol=0)
    b.set_epoch(1)
    assert not torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], ImageDataset(sample_dir, SIZE, seed=4)[5][0])


def test_corrupt_file_is_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(8):
        _write_image(tmp_path / "cls" / f"{i}.jpg", "RGB")
    (tmp_path / "cls" / "3.jpg").write_bytes(np.random.default_rng(0).bytes(1000))
    loader = build_loader(_spec(tmp_path, micro_batch=8, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, SIZE, SIZE)
    assert batch["index"].tolist() == [0, 1, 2, 4, 4, 5, 6, 7]  # 3 replaced by the next file
    assert loader.dataset.num_skipped == 1
    assert "3.jpg" in caplog.text


# ---- loader ----

def test_batch_shape_dtype_and_normalization(sample_dir: Path) -> None:
    loader = build_loader(_spec(sample_dir, micro_batch=8))
    assert loader.steps_per_epoch == len(loader) == 40 // 8
    batches = list(loader)
    assert len(batches) == 5
    images = torch.cat([b["images"] for b in batches])
    assert images.shape == (40, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert batches[0]["index"].dtype == torch.long
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(40))  # a permutation
    # Normalized with ImageNet statistics: values span [(0 - mean) / std, (1 - mean) / std].
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.all(images.amin(dim=(0, 2, 3)) >= -mean / std - 1e-5)
    assert torch.all(images.amax(dim=(0, 2, 3)) <= (1 - mean) / std + 1e-5)
    assert -1.0 < images.mean().item() < 1.0
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["index"], batches[0]["index"])  # reshuffled


def test_world_size_invariance(sample_dir: Path) -> None:
    single = list(build_loader(_spec(sample_dir, micro_batch=8, seed=5)).iter_from(epoch=2, step_in_epoch=0))
    ranks = [list(build_loader(_spec(sample_dir, micro_batch=4, rank=r, world_size=2, seed=5)).iter_from(2, 0))
             for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for step, full in enumerate(single):
        for key in ("images", "index"):
            joined = torch.cat([ranks[0][step][key], ranks[1][step][key]])
            torch.testing.assert_close(joined, full[key], rtol=0, atol=0)


def test_iter_from_equals_tail_of_epoch_with_workers(sample_dir: Path) -> None:
    loader = build_loader(_spec(sample_dir, micro_batch=8, num_workers=2))
    loader.set_epoch(1)
    full = list(loader)
    resumed = list(build_loader(_spec(sample_dir, micro_batch=8, num_workers=0)).iter_from(1, 3))
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(loader.iter_from(1, loader.steps_per_epoch)) == []


def test_drop_last_false_pads_last_global_batch(sample_dir: Path) -> None:
    loader = build_loader(_spec(sample_dir, micro_batch=6, drop_last=False, shuffle=False))
    indices = [b["index"].tolist() for b in loader]
    assert len(indices) == loader.steps_per_epoch == 7
    assert indices[-1] == [36, 37, 38, 39, 0, 1]


def test_default_path_uses_sample_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMG2VEC_CACHE", str(tmp_path))
    monkeypatch.setattr("dataloading.loader.sample_dataset_dir", lambda: sample_dataset_dir(num_images=16))
    loader = build_loader(_spec("", micro_batch=4, backend="auto"))
    assert len(loader.dataset) == 16
    assert str(loader.dataset.paths[0]).startswith(str(tmp_path))


# ---- errors ----

@pytest.mark.parametrize(
    "make_path, spec_kwargs, error, match",
    [
        (lambda d, s: d / "missing", {}, FileNotFoundError, "does not exist"),
        (lambda d, s: d, {}, ValueError, "no images found"),
        (lambda d, s: s, {"micro_batch": 32, "world_size": 2}, ValueError, "fewer than one global batch"),
        (lambda d, s: s, {"backend": "dali"}, NotImplementedError, "data_backend='dali' is not implemented yet"),
        (lambda d, s: s, {"rank": 2, "world_size": 2}, ValueError, "rank must be in"),
    ],
)
def test_clear_errors(tmp_path: Path, sample_dir: Path, make_path, spec_kwargs, error, match) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(error, match=match) as info:
        build_loader(_spec(make_path(tmp_path, sample_dir), **spec_kwargs))
    assert "\n" not in str(info.value)
