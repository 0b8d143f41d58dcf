"""Tests for the DALI backend (CPU pipeline here; GPU cases are marked `cuda`), backend choice,
broken inputs on every backend, and `python -m dataloading.verify`."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

import dataloading.dali as dali_module  # noqa: E402
import dataloading.verify as verify_module  # noqa: E402
from dataloading import DataError, LoaderSpec, build_loader, resolve_backend, sample_dataset_dir  # noqa: E402
from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dataloading.sources import check_image  # noqa: E402

SIZE = 32
MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
BACKENDS = ["torch", "dali"]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_dataset_dir(tmp_path_factory.mktemp("cache"), num_images=40, seed=0)


def _spec(path: Path | str, **kwargs) -> LoaderSpec:
    defaults = dict(data_path=str(path), image_size=SIZE, micro_batch=8, num_workers=1, backend="dali")
    return LoaderSpec(**{**defaults, **kwargs})


def _epoch(loader, epoch: int = 0, step: int = 0) -> list[dict]:
    return list(loader.iter_from(epoch, step))


def _cat(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


# ---- broken inputs: one tree with every kind of broken file ----

BAD = {  # file -> the start of the reason every backend gives
    "b/truncated.jpg": "truncated JPEG",
    "b/zero.jpg": "zero-byte file",
    "b/random.jpg": "not an image",
}
ODD = ["b/alpha.png", "b/gray.jpg", "b/cmyk.jpg", "b/one_pixel.jpg", "b/palette.png", "b/gif_named.jpg"]


def make_broken_tree(root: Path, good: int = 10) -> Path:
    """root/a: `good` plain JPEGs; root/b: every broken and odd case; root/empty: an empty class folder."""
    rng = np.random.default_rng(0)

    def noise(w: int = 64, h: int = 48) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "empty").mkdir()
    for i in range(good):
        noise().save(root / "a" / f"{i:02d}.jpg", quality=90)
    buffer = io.BytesIO()
    noise().save(buffer, format="JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "b" / "zero.jpg").write_bytes(b"")
    (root / "b" / "random.jpg").write_bytes(rng.bytes(3000))
    rgba = np.array(noise().convert("RGBA"))
    rgba[..., 3] = 100
    Image.fromarray(rgba).save(root / "b" / "alpha.png")
    noise().convert("L").save(root / "b" / "gray.jpg")
    noise().convert("CMYK").save(root / "b" / "cmyk.jpg")
    noise(1, 1).save(root / "b" / "one_pixel.jpg")
    noise().convert("P").save(root / "b" / "palette.png")
    noise().save(root / "b" / "gif_named.jpg", format="GIF")  # PIL reads it, DALI's decoders do not
    (root / "b" / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_broken_tree(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_inputs_are_skipped_named_and_never_crash(broken_dir: Path, backend: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="img2vec.data"):
        loader = build_loader(_spec(broken_dir, backend=backend, micro_batch=4, drop_last=False))
        batches = _epoch(loader) + _epoch(loader, 1)
    assert loader.backend == ("torch" if backend == "torch" else "dali-cpu")
    images = _cat(batches, "images")
    assert images.shape[1:] == (3, SIZE, SIZE) and torch.isfinite(images).all()
    used = {loader.source.names[i] for i in _cat(batches, "index").tolist()}
    skipped = dict(loader.skipped_files())
    expected_bad = dict(BAD)
    assert {str(Path(name).relative_to(broken_dir)) for name in skipped} == set(expected_bad)
    for name, reason in skipped.items():
        assert reason.startswith(expected_bad[str(Path(name).relative_to(broken_dir))])
        assert caplog.text.count(f"skipping unreadable image {name}") == 1  # named once, over two epochs
    for odd in ODD:  # decodable oddities are converted to RGB and used
        assert str(broken_dir / odd) in used or odd in expected_bad, odd
    assert not used & set(skipped)
    assert "README.txt" in caplog.text and "hold no images: empty" in caplog.text  # the listing says what it left out


def test_odd_images_decode_like_pil_to_rgb(broken_dir: Path) -> None:
    """Gray, alpha, palette, GIF (re-encoded) and 1x1 images on DALI agree with the torch backend (central view)."""
    spec = dict(augment=False, shuffle=False, micro_batch=4, drop_last=False)
    torch_batches = _epoch(build_loader(_spec(broken_dir, backend="torch", **spec)))
    dali_batches = _epoch(build_loader(_spec(broken_dir, **spec)))
    assert torch.equal(_cat(torch_batches, "index"), _cat(dali_batches, "index"))
    names = build_loader(_spec(broken_dir, backend="torch", **spec)).source.names
    t, d = _cat(torch_batches, "images"), _cat(dali_batches, "images")
    for k, i in enumerate(_cat(torch_batches, "index").tolist()):
        if names[i].endswith(("cmyk.jpg",)):
            continue  # PIL converts CMYK naively, DALI with colour management: both RGB, not equal
        diff = ((t[k] - d[k]).abs() * STD).mean().item() * 255
        assert diff < 1.0, (names[i], diff)
    gray = [k for k, i in enumerate(_cat(dali_batches, "index").tolist()) if names[i].endswith("gray.jpg")]
    pixels = d[gray[0]] * STD + MEAN
    torch.testing.assert_close(pixels[0], pixels[1], atol=2 / 255, rtol=0)  # gray -> R = G = B


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_missing_data_sets_fail_at_start_up_in_one_line(tmp_path: Path, backend: str) -> None:
    (tmp_path / "empty" / "empty_class").mkdir(parents=True)
    (tmp_path / "all_bad" / "cls").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "all_bad" / "cls" / f"{i}.jpg").write_bytes(b"\0" * i)
    for path, error, match in [
        (tmp_path / "missing", FileNotFoundError, "does not exist"),
        (tmp_path / "empty", ValueError, "no images found"),
        (tmp_path / "all_bad", ValueError, "none of the 4 files of the data set is a usable image"),
    ]:
        with pytest.raises(error, match=match) as info:
            build_loader(_spec(path, backend=backend, micro_batch=2))
        assert "\n" not in str(info.value)


def _lenient_check(data: bytes, max_image_pixels: int = 0):
    """check_image that lets truncated JPEGs through, so DALI meets one mid-run."""
    try:
        return check_image(data)
    except Exception as err:
        if "truncated" in str(err):
            return "JPEG", 48, 64
        raise


def test_dali_decode_error_mid_run_is_recovered(broken_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A file that passes the cheap check but fails DALI's decoder: skipped, named, the epoch completes."""
    monkeypatch.setattr(dali_module, "check_image", _lenient_check)
    loader = build_loader(_spec(broken_dir, micro_batch=4, drop_last=False))
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        batches = _epoch(loader)
    assert len(batches) == loader.steps_per_epoch
    skipped = dict(loader.skipped_files())
    truncated = str(broken_dir / "b" / "truncated.jpg")
    assert "DALI: decode error" in skipped[truncated]
    assert truncated not in {loader.source.names[i] for i in _cat(batches, "index").tolist()}
    assert "re-encoded" not in caplog.text  # the culprit was found in the batch that failed


def test_file_dali_cannot_decode_is_fed_reencoded(broken_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch DALI fails on although PIL decodes every file is re-run with BMP re-encodes."""
    real = dali_module.DaliLoader._feed
    failures = []

    def feed_breaking_step_1(self, epoch, start_step, fed):
        for step, (encoded, *rest) in enumerate(real(self, epoch, start_step, fed), start_step):
            if step == 1 and not self._transcode:  # garbage until the loader re-encodes the batch
                failures.append(step)
                encoded = [np.frombuffer(b"\xff\xd8\xff\xda" + b"\x00" * 64, np.uint8) for _ in encoded]
            yield (encoded, *rest)

    monkeypatch.setattr(dali_module.DaliLoader, "_feed", feed_breaking_step_1)
    good = [f"a/{i:02d}.jpg" for i in range(8)]
    (broken_dir.parent / "list.txt").write_text("".join(f"{broken_dir / g}\n" for g in good))
    loader = build_loader(_spec(broken_dir.parent / "list.txt", micro_batch=4, shuffle=False))
    batches = _epoch(loader)
    assert failures == [1] and len(batches) == 2 and loader.skipped_files() == []
    assert loader._transcode == {4, 5, 6, 7}


# ---- DALI CPU pipeline: shapes, parity with torchvision, sharding, resume ----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_shape_dtype_range(sample_dir: Path, dtype: str) -> None:
    loader = build_loader(_spec(sample_dir, dtype=dtype))
    assert loader.backend == "dali-cpu" and loader.steps_per_epoch == len(loader) == 5
    batches = _epoch(loader)
    assert len(batches) == 5
    images = _cat(batches, "images")
    assert images.shape == (40, 3, SIZE, SIZE) and images.dtype == getattr(torch, dtype)
    assert batches[0]["index"].dtype == torch.long and batches[0]["index"].shape == (8,)
    assert sorted(_cat(batches, "index").tolist()) == list(range(40))  # each file once per epoch
    images = images.float()
    assert torch.all(images.amin(dim=(0, 2, 3)) >= (-MEAN / STD).flatten() - 0.02)
    assert torch.all(images.amax(dim=(0, 2, 3)) <= ((1 - MEAN) / STD).flatten() + 0.02)
    assert images.std() > 0.3  # real photographs, not a constant
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["index"], batches[0]["index"])  # reshuffled


@pytest.mark.parametrize("augment", [False, True])
def test_sampler_source_matches_torchvision_within_decoder_tolerance(sample_dir: Path, augment: bool) -> None:
    """Same files and crop boxes as the torch backend; pixels differ only by JPEG decoder and resampler rounding.

    Measured on the sample set at 32 to 224 px: mean |diff| 0.15-0.17/255, 99th percentile 1-2/255.
    """
    spec = dict(augment=augment, seed=3, micro_batch=8)
    reference = _epoch(build_loader(_spec(sample_dir, backend="torch", **spec)), 1)
    batches = _epoch(build_loader(_spec(sample_dir, **spec)), 1)
    assert torch.equal(_cat(reference, "index"), _cat(batches, "index"))
    diff = (_cat(reference, "images") - _cat(batches, "images")).abs() * STD * 255  # in 8-bit levels
    assert diff.mean() < 0.5 and torch.quantile(diff.flatten()[::7], 0.99) < 3.0, (diff.mean(), diff.max())


def test_sampler_source_world_size_invariance_and_exact_resume(sample_dir: Path) -> None:
    single = _epoch(build_loader(_spec(sample_dir, seed=5)), 2)
    ranks = [_epoch(build_loader(_spec(sample_dir, micro_batch=4, rank=r, world_size=2, seed=5)), 2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for step, full in enumerate(single):
        for key in ("images", "index"):
            torch.testing.assert_close(torch.cat([ranks[0][step][key], ranks[1][step][key]]), full[key], rtol=0, atol=0)
    resumed = _epoch(build_loader(_spec(sample_dir, seed=5)), 2, 3)
    assert len(resumed) == 2
    for a, b in zip(single[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_last_batch_policy(sample_dir: Path) -> None:
    """40 files, 2 ranks x 6: drop_last keeps 3 full steps; otherwise 4 steps, the last padded, on both ranks."""
    for drop_last, steps in [(True, 3), (False, 4)]:
        runs = [_epoch(build_loader(_spec(sample_dir, micro_batch=6, rank=r, world_size=2,
                                          drop_last=drop_last))) for r in range(2)]
        assert [len(run) for run in runs] == [steps, steps]
        assert all(b["images"].shape[0] == 6 for run in runs for b in run)
        seen = torch.cat([_cat(run, "index") for run in runs]).tolist()
        if drop_last:
            assert len(set(seen)) == len(seen) == 36
        else:
            assert set(seen) == set(range(40)) and len(seen) == 48  # 8 padding samples repeat files


def test_webdataset_shards_on_dali(sample_dir: Path, tmp_path: Path) -> None:
    from test_dataloading import make_shards

    make_shards(sorted(sample_dir.rglob("*.jpg"))[:20], tmp_path / "wds", per_shard=6)  # 4 shards: 6 + 6 + 6 + 2
    torch_view = build_loader(_spec(tmp_path / "wds", backend="torch", augment=False, micro_batch=4))
    reference = {i: img for b in _epoch(torch_view) for i, img in zip(b["index"].tolist(), b["images"])}
    loader = build_loader(_spec(tmp_path / "wds", augment=False, micro_batch=4))
    batches = _epoch(loader)
    assert len(batches) == 5 and sorted(_cat(batches, "index").tolist()) == list(range(20))
    for b in batches:  # the index names the member that was decoded
        for i, image in zip(b["index"].tolist(), b["images"]):
            assert ((image - reference[i]).abs() * STD * 255).mean() < 1.5, i


# ---- backend choice and clear errors ----

def test_auto_picks_dali_cpu_here_and_torch_without_dali(sample_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert resolve_backend(_spec(sample_dir, backend="auto")) == ("dali", expected)
    with caplog.at_level(logging.INFO, logger="img2vec.data"):
        assert build_loader(_spec(sample_dir, backend="auto")).backend == f"dali-{expected}"
    assert f"data_backend=auto -> dali-{expected} loader:" in caplog.text
    monkeypatch.setattr("dataloading.loader.dali_import_error", lambda: "ImportError: No module named 'nvidia.dali'")
    assert build_loader(_spec(sample_dir, backend="auto")).backend == "torch"
    with pytest.raises(DataError, match="data_backend='dali' needs NVIDIA DALI .*use data_backend=torch") as info:
        build_loader(_spec(sample_dir, backend="dali"))
    assert "\n" not in str(info.value)


def test_auto_falls_back_to_torch_when_the_pipeline_cannot_start(sample_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken(self):
        raise RuntimeError("nvJPEG init failed")

    monkeypatch.setattr(dali_module.DaliLoader, "_smoke_graph", broken)
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        assert build_loader(_spec(sample_dir, backend="auto")).backend == "torch"
    assert "DALI failed to start (RuntimeError: nvJPEG init failed)" in caplog.text
    with pytest.raises(RuntimeError, match="nvJPEG init failed"):
        build_loader(_spec(sample_dir, backend="dali"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_dali_gpu_without_cuda_fails_in_one_line(sample_dir: Path) -> None:
    with pytest.raises(DataError, match="dali_device='gpu' needs a CUDA device") as info:
        build_loader(_spec(sample_dir, dali_device="gpu"))
    assert "\n" not in str(info.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_batches_on_device_match_cpu(sample_dir: Path) -> None:
    gpu = _epoch(build_loader(_spec(sample_dir, dali_device="gpu", augment=False, shuffle=False,
                                    dtype="bfloat16", num_workers=4)))
    cpu = _epoch(build_loader(_spec(sample_dir, dali_device="cpu", augment=False, shuffle=False)))
    assert gpu[0]["images"].device.type == "cuda" and gpu[0]["images"].dtype == torch.bfloat16
    by_index = {i: img for b in cpu for i, img in zip(b["index"].tolist(), b["images"])}
    for b in gpu:  # nvJPEG vs libjpeg-turbo: a few levels apart
        for i, image in zip(b["index"].tolist(), b["images"].float().cpu()):
            assert ((image - by_index[i]).abs() * STD * 255).mean() < 3.0


# ---- python -m dataloading.verify ----

def test_verify_lists_every_skip_with_its_reason(broken_dir: Path, sample_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert verify_module.main([str(broken_dir)]) == 1
    out = capsys.readouterr().out
    for name, reason in BAD.items():
        assert f"SKIP {broken_dir / name}: {reason}" in out
    assert out.count("SKIP ") == len(BAD)
    assert "README.txt" in out and "hold no images: empty" in out
    assert f"{len(BAD)} of 19 files would be skipped" in out
    assert verify_module.main([str(broken_dir), "--full", "--workers", "1"]) == 1
    assert verify_module.main([str(sample_dir)]) == 0
    assert verify_module.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_scan_in_worker_processes_finds_the_same(broken_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataloading import open_source

    source = open_source(broken_dir)
    serial = verify_module.scan(source)
    monkeypatch.setattr(verify_module, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(verify_module, "_CHUNK", 4)
    assert verify_module.scan(source, workers=2) == serial
    assert len(serial) == len(BAD)


def test_verify_runs_as_a_module(broken_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dataloading.verify", str(broken_dir)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.count("SKIP ") == len(BAD)


def test_dali_import_error_says_why_when_dali_is_missing(monkeypatch):
    """What the benchmarks' skip and the loader's error print on a machine without DALI."""
    from dataloading.dali import dali_import_error

    assert dali_import_error() is None  # installed here
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import of it now fails as if uninstalled
    why = dali_import_error()
    assert why.startswith(("ImportError", "ModuleNotFoundError")) and "nvidia.dali" in why and "\n" not in why
