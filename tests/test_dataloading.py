"""Tests for dataloading/ on the torch backend: sample set, sources (folder, list, WebDataset),
ImageDataset, seeded augmentation, sharding, resume, skipped files, verify, errors.

DALI's pipelines, and the broken-input cases run on every backend, are in tests/test_dali.py.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from dataloading import ImageDataset, LoaderSpec, build_loader, open_source, sample_dataset_dir
from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD, augment_params, sample_crop
from dataloading.sources import BadImage, TarSource, check_image, tar_index
from dataloading.sources import main as sources_main

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
    lines = [f"{Path(p).relative_to(sample_dir)} {label}" for p, label in zip(folder.paths[:3], folder.labels[:3])]
    lines.append(str(folder.paths[3]))
    list_file = sample_dir / "subset.txt"
    list_file.write_text("\n".join(lines) + "\n\n")
    listed = ImageDataset(list_file, SIZE)
    assert listed.paths == folder.paths[:4] and isinstance(listed.paths[0], str)
    assert listed.labels == folder.labels[:3] + [-1]
    torch.testing.assert_close(listed[2][0], folder[2][0], rtol=0, atol=0)
    list_file.unlink()


def test_extensions_case_insensitive_and_modes_to_rgb(tmp_path: Path) -> None:
    for name, mode in [("gray.JPG", "L"), ("cmyk.jpeg", "CMYK"), ("rgba.PNG", "RGBA"), ("palette.png", "P")]:
        _write_image(tmp_path / "cls" / name, mode)
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    dataset = ImageDataset(tmp_path, SIZE)
    assert sorted(Path(p).name for p in dataset.paths) == ["cmyk.jpeg", "gray.JPG", "palette.png", "rgba.PNG"]
    for i in range(len(dataset)):
        image, index = dataset[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert index == i
    gray = dataset[dataset.paths.index(str(tmp_path / "cls" / "gray.JPG"))][0]
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
    assert loader.skipped_files() == [(str(tmp_path / "cls" / "3.jpg"), "not an image (no format PIL recognises)")]
    assert "skipped" not in batch  # the side channel from the workers is consumed by the loader


def test_skips_travel_back_from_worker_processes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With 2 DataLoader workers the skips happen in other processes; the loader still names each once."""
    for i in range(8):
        _write_image(tmp_path / "cls" / f"{i}.jpg", "RGB")
    (tmp_path / "cls" / "2.jpg").write_bytes(b"")
    whole = (tmp_path / "cls" / "5.jpg").read_bytes()
    (tmp_path / "cls" / "6.jpg").write_bytes(whole[: len(whole) // 2])
    loader = build_loader(_spec(tmp_path, micro_batch=4, num_workers=2))
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        for epoch in range(2):
            assert len(list(loader.iter_from(epoch, 0))) == 2
    assert dict(loader.skipped_files()) == {
        str(tmp_path / "cls" / "2.jpg"): "zero-byte file",
        str(tmp_path / "cls" / "6.jpg"): "truncated JPEG (no end-of-image marker after the last scan)",
    }
    assert caplog.text.count("2.jpg") == 1  # logged once, not once per worker per epoch


def test_check_image_reasons() -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    assert check_image(jpeg) == ("JPEG", 20, 30)
    assert check_image(jpeg + b"\0" * 100)[0] == "JPEG"  # bytes after the end marker are harmless
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 7)).save(buffer, format="PNG")
    assert check_image(buffer.getvalue()) == ("PNG", 7, 5)
    for data, reason in [
        (b"", "zero-byte file"),
        (b"hello world" * 50, "not an image"),
        (jpeg[: (jpeg.rfind(b"\xff\xda") + len(jpeg)) // 2], "truncated JPEG"),  # cut inside the scan data
        (buffer.getvalue()[:-20], "truncated PNG"),
    ]:
        with pytest.raises(BadImage, match=reason):
            check_image(data)


def test_augment_off_is_the_central_square() -> None:
    assert augment_params(40, 100, 0, 0, 7, augment=False) == (0, 30, 40, 40, False)
    assert augment_params(9, 4, 0, 0, 7, augment=False) == (2, 0, 4, 4, False)
    boxes = {augment_params(40, 100, 0, e, 7) for e in range(4)}
    assert len(boxes) == 4  # augment on: the box changes with the epoch


# ---- WebDataset shards ----

def make_shards(files: list[Path], out: Path, per_shard: int) -> list[Path]:
    """Tar shards in WebDataset layout: per sample key.jpg (or .png) + key.cls; one metadata-only sample per shard."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(files), per_shard):
        shard = out / f"train-{start // per_shard:03d}.tar"
        with tarfile.open(shard, "w") as tar:
            for k, f in enumerate(files[start : start + per_shard]):
                key = f"n{start + k:05d}"
                for name, data in ((f"{key}{f.suffix.lower()}", f.read_bytes()), (f"{key}.cls", b"3")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"meta{start}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        shards.append(shard)
    return shards


def test_webdataset_source_index_and_torch_loader(tmp_path: Path, sample_dir: Path) -> None:
    folder = ImageDataset(sample_dir, SIZE, augment=False)
    shards = make_shards([Path(p) for p in folder.paths[:20]], tmp_path / "wds", per_shard=8)
    assert not shards[0].with_suffix(".idx").exists()
    for path in (tmp_path / "wds", str(tmp_path / "wds" / "train-*.tar"), shards[1]):
        source = open_source(path)
        assert isinstance(source, TarSource) and source.kind == "webdataset"
        assert source.notes and "no image component" in source.notes[0]  # the meta*.json samples
    source = open_source(tmp_path / "wds")
    assert len(source) == 20 and source.names[9] == f"{shards[1]}:n00009.jpg"
    assert all(source.read(i) == Path(folder.paths[i]).read_bytes() for i in (0, 9, 19))
    assert source.index_at(1, int(source.offsets[9])) == 9
    # The index is built beside each shard, in DALI's format; wds2idx (DALI's own tool) writes the same bytes.
    index = shards[0].with_suffix(".idx")
    assert index.read_text().startswith("v1.2 9\n")  # 8 images + 1 metadata sample
    if shutil.which("wds2idx"):
        subprocess.run(["wds2idx", str(shards[0]), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == index.read_text()
    # `python -m dataloading.sources SHARD...` builds indexes ahead of time.
    index.unlink()
    assert sources_main([str(shards[0])]) == 0 and index.read_text().startswith("v1.2 9\n")
    # A stale index (older than its shard) is rebuilt; a fresh one is reused untouched.
    index.write_text("v1.2 0\n")
    os.utime(index, ns=(0, 0))
    assert tar_index(shards[0]) == index and index.read_text().startswith("v1.2 9\n")
    mtime = index.stat().st_mtime_ns
    assert tar_index(shards[0]) == index and index.stat().st_mtime_ns == mtime
    # Torch backend over the shards: the same pixels as over the files they were made from.
    from_tar = ImageDataset(tmp_path / "wds", SIZE, augment=False)
    torch.testing.assert_close(from_tar[9][0], folder[9][0], rtol=0, atol=0)
    loader = build_loader(_spec(tmp_path / "wds", micro_batch=4))
    assert sorted(torch.cat([b["index"] for b in loader]).tolist()) == list(range(20))


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
    assert len(loader.source) == 16
    assert loader.source.names[0].startswith(str(tmp_path))


# ---- errors ----

@pytest.mark.parametrize(
    "make_path, spec_kwargs, error, match",
    [
        (lambda d, s: d / "missing", {}, FileNotFoundError, "does not exist"),
        (lambda d, s: d, {}, ValueError, "no images found"),
        (lambda d, s: s, {"micro_batch": 32, "world_size": 2}, ValueError, "fewer than one global batch"),
        (lambda d, s: s, {"backend": "jax"}, ValueError, "data_backend must be one of"),
        (lambda d, s: s, {"dtype": "int8"}, ValueError, "dtype must be one of"),
        (lambda d, s: d / "*.tar", {}, FileNotFoundError, "matches no files"),
        (lambda d, s: s, {"max_image_pixels": -1}, ValueError, "max_image_pixels must be >= 0"),
        (lambda d, s: s, {"rank": 2, "world_size": 2}, ValueError, "rank must be in"),
    ],
)
def test_clear_errors(tmp_path: Path, sample_dir: Path, make_path, spec_kwargs, error, match) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(error, match=match) as info:
        build_loader(_spec(make_path(tmp_path, sample_dir), **spec_kwargs))
    assert "\n" not in str(info.value)


# ---- command-line convention ----

@pytest.mark.parametrize("module, option", [
    ("dataloading.verify", "--max_image_pixels"), ("dataloading.sources", "SHARD.tar"), ("dataloading.digits", "--image_size"),
])
def test_commands_take_argv_and_show_defaults(module: str, option: str, capsys: pytest.CaptureFixture) -> None:
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert option in out and (module == "dataloading.sources" or "(default:" in out)
    with pytest.raises(SystemExit) as done:
        main(["--no_such_option"])
    assert done.value.code == 2


def test_digits_command_prints_the_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dataloading.digits import main

    assert main(["--output_dir", str(tmp_path), "--image_size", "8"]) == 0
    root = Path(capsys.readouterr().out.strip())
    assert root.parent == tmp_path and (root / "train").is_dir() and (root / "val").is_dir()
    assert main(["--output_dir", str(tmp_path), "--image_size", "4"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
