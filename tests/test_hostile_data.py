"""Hostile data: damaged shards, 16-bit PNGs, directory link loops, huge images, mid-file JPEG damage,
newlines in file names, and the data sets that cannot start a run (one line, DataError, exit 2).

Each case runs the real loader (both backends where DALI is installed) or `python -m dataloading.verify`
as a user would meet it: its main(argv) in this process, with stdout and stderr captured at the file
descriptors (libjpeg writes to fd 2), and once in a child process.
"""
from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_main
from PIL import Image

from dataloading import DataError, LoaderSpec, build_loader, open_source
from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32
MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
REPO = Path(__file__).resolve().parents[1]
try:
    import nvidia.dali  # noqa: F401

    BACKENDS = ["torch", "dali"]
except ImportError:
    BACKENDS = ["torch"]


def _spec(path: Path | str, **kwargs) -> LoaderSpec:
    defaults = dict(data_path=str(path), image_size=SIZE, micro_batch=4, num_workers=0, backend="torch",
                    dali_device="cpu")
    return LoaderSpec(**{**defaults, **kwargs})


def _jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good_tree(root: Path, count: int, cls: str = "a") -> Path:
    (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / cls / f"{i:02d}.jpg").write_bytes(_jpeg(i))
    return root


def _zero_mid_scan(data: bytes, length: int = 200) -> bytes:
    """A JPEG with `length` bytes of its entropy-coded data zeroed in the middle: the header and end marker stay."""
    sos = data.rfind(b"\xff\xda")
    mid = (sos + len(data)) // 2
    return data[:mid] + bytes(length) + data[mid + length :]


def _verify_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataloading.verify", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def _verify(capfd: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`python -m dataloading.verify args` run through its main in this process; an exception that
    escapes main (a traceback for the user) fails the test."""
    rc, out, err = run_main(capfd, "dataloading.verify", *args)
    return subprocess.CompletedProcess(["dataloading.verify", *args], rc, out, err)


def _one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- a WebDataset shard cut short ----

def _shard(path: Path, count: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for name, data in ((f"s{i:03d}.jpg", _jpeg(i)), (f"s{i:03d}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _cut_inside_member(shard: Path, member: str) -> None:
    """Truncate `shard` half-way through the data of `member` (as an interrupted copy leaves it)."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    with open(shard, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_keeps_what_precedes_the_damage_and_says_what_was_lost(tmp_path: Path, backend: str,
                                                                              capfd: pytest.CaptureFixture) -> None:
    shards = tmp_path / "wds"
    shards.mkdir()
    _shard(shards / "train-000.tar", 8)
    _cut_inside_member(_shard(shards / "train-001.tar", 8), "s005.jpg")  # s000..s004 whole, s005 cut, s006.. gone
    loader = build_loader(_spec(shards, backend=backend))
    assert len(loader.source) == 8 + 5
    (lost,) = loader.source.lost
    assert "train-001.tar is cut short" in lost and "lost 1 sample(s) cut off mid-member" in lost
    for epoch in range(2):
        batches = list(loader.iter_from(epoch, 0))
        assert len(batches) == 3 and all(torch.isfinite(b["images"]).all() for b in batches)
    assert loader.skipped_files() == []
    proc = _verify(capfd, str(shards))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "LOST " in proc.stdout and "0 of 13 files would be skipped" in proc.stdout
    # A shard cut inside a tar header (no member data lost mid-way, the end-of-archive marker gone).
    with open(shards / "train-000.tar", "r+b") as f:
        f.truncate(512 * 3 + 100)
    assert any("train-000.tar is cut short" in note for note in open_source(shards).lost)


def test_shard_that_is_no_tar_at_all_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "only.tar").write_bytes(b"\x01" * 300)
    with pytest.raises(DataError, match="no images found.*not a readable tar") as info:
        build_loader(_spec(tmp_path / "only.tar"))
    assert "\n" not in str(info.value)
    _one_line_error(_verify_process(str(tmp_path / "only.tar")))  # the real command line, in a child process


# ---- 16-bit PNG ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_png_is_scaled_not_whitened(tmp_path: Path, backend: str) -> None:
    """A 16-bit gray PNG decodes like its 8-bit version (value / 257), on every backend."""
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)  # (H, W)
    (tmp_path / "wide" / "c").mkdir(parents=True)
    (tmp_path / "narrow" / "c").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.roll(ramp, 7 * i, axis=1)).save(tmp_path / "wide" / "c" / f"{i}.png")
        narrow = np.round(np.roll(ramp, 7 * i, axis=1) / 257).astype(np.uint8)
        Image.fromarray(narrow).save(tmp_path / "narrow" / "c" / f"{i}.png")
    assert Image.open(tmp_path / "wide" / "c" / "0.png").mode.startswith("I")
    kwargs = dict(backend=backend, augment=False, shuffle=False)
    wide = next(iter(build_loader(_spec(tmp_path / "wide", **kwargs))))["images"] * STD + MEAN  # (4, 3, S, S) in [0, 1]
    narrow = next(iter(build_loader(_spec(tmp_path / "narrow", **kwargs))))["images"] * STD + MEAN
    assert (wide > 0.999).float().mean() < 0.05  # the bug: 99% of the pixels at 255
    assert (wide - narrow).abs().max() * 255 < 1.01


# ---- directory link loops ----

def test_directory_link_loop_lists_each_real_directory_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _good_tree(tmp_path / "data", 6)
    os.symlink("..", root / "a" / "up")  # a/up -> a: a loop
    os.symlink(root / "a", root / "b")  # class b is class a again
    (root / "c").mkdir()
    (root / "c" / "0.jpg").write_bytes(_jpeg(99))
    os.symlink(root / "c", root / "a" / "to_c")  # a real directory reached twice
    source = open_source(root)
    real = {os.path.realpath(name) for name in source.names}
    assert len(source) == len(real) == 7, len(source)
    assert any("link(s) to a directory already listed" in note for note in source.notes)
    loader = build_loader(_spec(root, micro_batch=7))
    assert loader.steps_per_epoch == 1


# ---- huge images ----

@functools.cache
def _huge_png_bytes(side: int = 12000) -> bytes:
    """A 12000 x 12000 PNG (144 MP) that is small on disk: 1-bit grayscale, all black. Written
    chunk by chunk: PIL's encoder takes seconds for this many rows, zlib a fraction of one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes(1 + (side + 7) // 8) * side  # each row: filter type 0, then side black pixels, 8 per byte
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _huge_png(path: Path) -> None:
    path.write_bytes(_huge_png_bytes())


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_above_the_pixel_cap_is_skipped_with_a_reason(tmp_path: Path, backend: str,
                                                            capfd: pytest.CaptureFixture) -> None:
    root = _good_tree(tmp_path, 4)
    _huge_png(root / "a" / "02_huge.png")
    loader = build_loader(_spec(root, backend=backend, shuffle=False, micro_batch=5))
    batch = next(iter(loader))
    assert batch["images"].shape == (5, 3, SIZE, SIZE)
    ((name, reason),) = loader.skipped_files()
    assert name.endswith("02_huge.png")
    assert reason.startswith("12000x12000 = 144 MP, above max_image_pixels 64000000")
    # The cap is a setting: lowered, it skips the ordinary 64 x 48 images too.
    with pytest.raises(DataError, match="none of the 5 files .* above max_image_pixels 1000"):
        build_loader(_spec(root, backend=backend, micro_batch=5, max_image_pixels=1000))
    proc = _verify(capfd, str(root), "--max_image_pixels", "0")
    assert proc.returncode == 0, proc.stdout  # 0: no cap, the huge PNG is an image like any other
    proc = _verify(capfd, str(root))
    assert proc.returncode == 1 and proc.stdout.count("SKIP ") == 1 and "144 MP" in proc.stdout


# ---- verify --full: damage in the middle of a JPEG ----

def test_verify_full_finds_mid_stream_jpeg_damage(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = _good_tree(tmp_path, 3)
    damaged = _zero_mid_scan(_jpeg(7, (128, 96)))
    (root / "a" / "damaged.jpg").write_bytes(damaged)
    Image.open(io.BytesIO(damaged)).convert("RGB")  # PIL decodes it without complaint: the header check cannot see it
    quick = _verify(capfd, str(root))
    assert quick.returncode == 0, quick.stdout
    full = _verify(capfd, str(root), "--full")
    assert full.returncode == 1, (full.stdout, full.stderr)
    assert full.stdout.count("SKIP ") == 1
    assert f"SKIP {root / 'a' / 'damaged.jpg'}: damaged JPEG data" in full.stdout
    assert "Corrupt JPEG data" not in full.stderr  # libjpeg's own print is captured, not leaked


# ---- newlines in file names ----

def test_verify_prints_names_escaped_one_record_per_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = _good_tree(tmp_path, 2)
    forged = "x.jpg\nSKIP forged.jpg"
    (root / "a" / forged).write_bytes(b"not an image")
    proc = _verify(capfd, str(root))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("SKIP ")] == [
        f"SKIP {root / 'a'}/x.jpg\\nSKIP forged.jpg: not an image (no format PIL recognises)"]
    assert len(lines) == 2


# ---- data sets that cannot start a run: DataError, one line ----

def test_unusable_data_sets_raise_data_error_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    few = _good_tree(tmp_path / "few", 3)
    all_bad = tmp_path / "all_bad"
    (all_bad / "a").mkdir(parents=True)
    for i in range(4):
        (all_bad / "a" / f"{i}.jpg").write_bytes(b"\xff" * i)
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "no images found"),
        (few, "data set has 3 images, fewer than one global batch"),
        (all_bad, "none of the 4 files of the data set is a usable image"),
        (few / "a" / "00.jpg", "is one image file; pass the ImageFolder root"),
    ]
    for path, match in cases:
        with pytest.raises(DataError, match=match) as info:
            build_loader(_spec(path, micro_batch=4))
        assert "\n" not in str(info.value), path


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_images_broken_past_the_header_check_is_one_line_from_worker_processes(tmp_path: Path, backend: str) -> None:
    """Every file passes the header check but fails the decode: a DataError in one line, not a worker traceback."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for i in range(4):  # PNGs whose compressed pixel data is zeroed in the middle; header and IEND intact
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        mid = len(data) // 2
        (root / "a" / f"{i}.png").write_bytes(data[:mid] + bytes(100) + data[mid + 100 :])
    loader = build_loader(_spec(root, backend=backend, num_workers=1))
    with pytest.raises(DataError, match=r"^none of the 4 images could be decoded; run python -m dataloading.verify") as info:
        next(iter(loader))
    assert "\n" not in str(info.value)


def test_verify_on_one_image_file_checks_it(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = _good_tree(tmp_path, 1)
    proc = _verify(capfd, str(root / "a" / "00.jpg"))
    assert proc.returncode == 0 and "0 of 1 files would be skipped" in proc.stdout, proc.stderr
    (root / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    proc = _verify(capfd, str(root / "a" / "bad.png"))
    assert proc.returncode == 1 and proc.stdout.startswith(f"SKIP {root / 'a' / 'bad.png'}: "), proc.stdout
    (root / "blob.bin").write_bytes(bytes(range(256)))  # neither an image nor a text list
    _one_line_error(_verify(capfd, str(root / "blob.bin")))
    _one_line_error(_verify(capfd, str(tmp_path / "nowhere")))
