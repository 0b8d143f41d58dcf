"""Token diversity and effective rank: exact cases, a numpy reference, chunking; the command."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from img2vec.diversity import main, parse_args
from img2vec.token_diversity import effective_rank, token_diversity


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors and models: OpenMP start-up costs more than it saves (and a busy CI box
    makes it far worse)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def diversity_np(f: np.ndarray) -> np.ndarray:
    """Hand-written: the full (N, N) cosine matrix, off-diagonal mean, per image. f (B, N, C)."""
    f = f.astype(np.float64)
    u = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    cos = u @ u.transpose(0, 2, 1)  # (B, N, N)
    N = f.shape[1]
    off = cos.sum((1, 2)) - np.trace(cos, axis1=1, axis2=2)
    return 1 - off / (N * (N - 1))


def orthonormal(n: int, k: int, gen) -> torch.Tensor:
    """(n, k) with orthonormal columns, fp64."""
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def test_identical_tokens_zero_orthogonal_one_opposite_two():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 1, 24, generator=g)
    scales = torch.rand(3, 10, 1, generator=g) + 0.1  # positive multiples: the same direction
    assert token_diversity(f * scales).abs().item() < 1e-6
    q = orthonormal(24, 10, g).T.float()  # 10 orthonormal tokens in 24 dims
    d = token_diversity(q[None] * scales, reduction="none")
    torch.testing.assert_close(d, torch.ones(3), atol=1e-6, rtol=0)
    # the upper end: N = 2 opposite tokens, mean cosine -1 -> diversity 2 (1 + 1/(N-1))
    assert abs(token_diversity(torch.cat([f, -f], 1)).item() - 2.0) < 1e-6


@pytest.mark.parametrize("shape", [(3, 37, 19), (2, 5, 300), (1, 196, 64), (4, 2, 1)])
def test_matches_numpy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    f = torch.randn(*shape, generator=g) + 0.3  # mixed signs, not zero-mean
    f[0, 0] = 0.0  # a zero token: cos 0 with everyone, in both
    ref = diversity_np(f.numpy())
    per_image = token_diversity(f, reduction="none")
    assert per_image.shape == (shape[0],) and per_image.dtype == torch.float32
    np.testing.assert_allclose(per_image.numpy(), ref, atol=1e-6, rtol=0)
    assert abs(token_diversity(f).item() - ref.mean()) < 1e-6
    assert ((per_image >= 0) & (per_image <= 2)).all()


def test_chunked_equals_unchunked_and_dtypes():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 50, 33, generator=g)
    full = token_diversity(f, chunk_size=50)
    for chunk in (1, 7, 49, 1000, None):
        assert abs(token_diversity(f, chunk_size=chunk).item() - full.item()) < 1e-7
    r_full = effective_rank(f, reduction="none", chunk_size=10_000)
    for chunk in (1, 5, 32):  # N > C: chunks over tokens; N <= C below: chunks over channels
        torch.testing.assert_close(effective_rank(f, reduction="none", chunk_size=chunk), r_full)
        torch.testing.assert_close(effective_rank(f.transpose(1, 2), reduction="none", chunk_size=chunk),
                                   effective_rank(f.transpose(1, 2), reduction="none"))
    assert abs(token_diversity(f.bfloat16()).item() - token_diversity(f.bfloat16().float()).item()) < 1e-6
    assert token_diversity(f[0]).shape == ()  # (N, C) is one image
    with pytest.raises(ValueError, match="N >= 2"):
        token_diversity(f[:, :1])


@pytest.mark.parametrize("N,C,r", [(196, 64, 10), (16, 384, 7), (40, 40, 1)])
def test_effective_rank_of_rank_r(N, C, r):
    g = torch.Generator().manual_seed(r)
    U, V = orthonormal(N, r, g), orthonormal(C, r, g)
    equal = (U @ V.T * 3.0).float()[None]  # r equal singular values -> exactly r
    assert abs(effective_rank(equal).item() - r) < 1e-3 * r
    s = torch.linspace(1.0, 0.2, r, dtype=torch.float64)
    unequal = (U * s @ V.T).float()[None]  # same rank, spread singular values: 1 <= erank < r
    e = effective_rank(unequal).item()
    assert 1.0 - 1e-6 <= e <= r + 1e-3 and (r == 1 or e < r - 0.05)
    # against numpy's SVD
    sv = np.linalg.svd(unequal[0].double().numpy(), compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    assert abs(e - np.exp(-(p * np.log(p)).sum())) < 1e-3
    assert effective_rank(torch.zeros(2, N, C), reduction="none").tolist() == [0.0, 0.0]


# --- the command ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A tiny ImageFolder: 6 JPEGs of different sizes and modes, two classes."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        h, w = 60 + 7 * i, 90 - 5 * i
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        im = Image.fromarray(img) if i != 3 else Image.fromarray(img[..., 0])  # one grayscale
        im.save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root


def test_command_ranks_teachers(image_dir, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "r.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in timm.create_model("test_resnet").state_dict().items()}},
               ckpt)
    out = tmp_path / "out"
    rc = main(["--teacher", "test_resnet", "--teacher_stage", "2,layer3", "--teacher_weights", str(ckpt),
               "--teacher", "test_vit", "--teacher_stage", "1", "--teacher", "hog", "--teacher", "pixels",
               "--data_path", str(image_dir), "--num_images", "5", "--image_size", "64", "--patch_size", "16",
               "--batch_size", "2", "--output_dir", str(out)])
    assert rc == 0
    report = json.loads((out / "diversity.json").read_text())
    rows = report["results"]
    assert report["images"] == 5 and report["grid"] == [4, 4]
    assert [(r["teacher"], r["module"]) for r in sorted(rows, key=lambda r: r["module"])] == [
        ("test_vit", "blocks.1"), ("hog", "hog8x8"), ("test_resnet", "layer2"), ("test_resnet", "layer3"),
        ("pixels", "patchify")]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    d = [r["diversity_mean"] for r in rows]
    assert d == sorted(d, reverse=True) and all(0 <= x <= 2 for x in d)
    assert all(1 <= r["effective_rank_mean"] <= r["effective_rank_max"] + 1e-3 for r in rows)
    assert {r["weights"] for r in rows} == {str(ckpt), "random", "none"}
    hog = next(r for r in rows if r["teacher"] == "hog")
    assert hog["channels"] == 108 and hog["kind"] == "hog" and hog["resampling"] == "4 cells concatenated"
    assert (out / "diversity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "test_resnet" in table and "2 (layer2)" in table and "1 (blocks.1)" in table and "hog8x8" in table


def test_command_args():
    args = parse_args(["--teacher", "resnet50", "--teacher", "vit_tiny_patch16_224", "--teacher_stage", "6",
                       "--teacher-stage", "11", "--teacher_weights", "v.pth"])
    assert args.entries == [{"teacher": "resnet50", "stages": [], "weights": None},
                            {"teacher": "vit_tiny_patch16_224", "stages": ["6", "11"], "weights": "v.pth"}]
    with pytest.raises(SystemExit):
        parse_args(["--teacher_stage", "3"])  # no --teacher before it
    with pytest.raises(SystemExit):
        parse_args(["--num_im", "3"])  # no abbreviations
    assert main(["--teacher", "vit_tiny", "--num_images", "1"]) == 2  # unknown name: one line, exit 2


def test_command_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--num_images", "256"), ("--image_size", "224"), ("--output_dir", "runs/diversity"),
                            ("--batch_size", "32")):
        assert option in text and f"(default: {default})" in text


def test_command_skips_an_unreadable_image_names_it_once_and_counts_it(image_dir, tmp_path, capsys, caplog):
    import logging
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    broken = data / "c0" / "2.jpg"
    broken.write_bytes(broken.read_bytes()[:600])  # a JPEG cut short
    out = tmp_path / "out"
    args = ["--teacher", "hog", "--data_path", str(data), "--image_size", "64", "--batch_size", "2",
            "--output_dir", str(out)]
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        assert main(args) == 0
    report = json.loads((out / "diversity.json").read_text())
    assert (report["images"], report["skipped"]) == (5, 1)
    assert caplog.text.count(f"skipping unreadable image {broken}: ") == 1
    assert capsys.readouterr().out.startswith(f"token diversity on 5 images ({data}, 1 unreadable skipped), 64 px")

    for path in data.glob("*/*.jpg"):  # nothing readable: one line, exit 2
        path.write_bytes(path.read_bytes()[:600])
    capsys.readouterr()
    assert main(args) == 2


def test_weight_free_teachers_warn_about_weights_only_when_some_are_passed(image_dir, tmp_path, caplog):
    import logging

    args = ["--data_path", str(image_dir), "--num_images", "2", "--image_size", "64", "--output_dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="img2vec.teacher"):
        assert main(["--teacher", "hog", "--teacher", "pixels", *args]) == 0
    assert "teacher_weights does not apply" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="img2vec.teacher"):
        assert main(["--teacher", "hog", "--teacher_weights", "w.pth", *args]) == 0
    assert caplog.text.count("teacher_weights does not apply to teacher hog (it has no weights): ignoring w.pth") == 1
    report = json.loads((tmp_path / "diversity.json").read_text())
    assert [r["weights"] for r in report["results"]] == ["none"]  # what was measured: the weights were ignored
