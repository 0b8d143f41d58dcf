"""The weight-free teachers (img2vec/hog.py): HOG against scikit-image, pixels against MAE's patchify."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from img2vec.hog import HOG_BINS, WeightFreeTeacher, cell_histograms, hog_cells, hog_channels, patchify
from img2vec.teacher import build_teacher

# float64 end to end: the two implementations then agree to rounding. The only intrinsic
# difference left would be a pixel whose angle falls on a bin edge in one and not the other;
# skimage computes the same rad2deg(atan2) % 180 in float64, so none does here.
HOG_ATOL = 1e-6


def _photo(h: int, w: int) -> np.ndarray:
    """A real RGB crop (h, w, 3) float64 in [0, 1]: edges, texture and flat sky."""
    import skimage.data

    return skimage.data.astronaut()[40:40 + h, 100:100 + w].astype(np.float64) / 255.0


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80)])
def test_hog_matches_skimage_per_channel(h, w):
    from skimage.feature import hog

    photo = _photo(h, w)
    ours = hog_cells(torch.from_numpy(photo).permute(2, 0, 1)[None])[0]  # (3, 9, h / 8, w / 8)
    assert ours.dtype == torch.float64 and ours.shape == (3, HOG_BINS, h // 8, w // 8)
    for c in range(3):
        # skimage, one channel at a time (with channel_axis it keeps only the strongest channel per
        # pixel; MaskFeat keeps all three), per-cell L2 normalization = 1x1-cell blocks with 'L2'
        ref = hog(photo[..., c], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1),
                  block_norm="L2", feature_vector=False)  # (h / 8, w / 8, 1, 1, 9)
        ref = torch.from_numpy(ref[:, :, 0, 0]).permute(2, 0, 1)  # (9, h / 8, w / 8)
        torch.testing.assert_close(ours[c], ref, atol=HOG_ATOL, rtol=0)
    assert ours.abs().sum() > 0


def _magnitude_and_bins(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    magnitude = torch.rand(6, 24, 40, generator=g, dtype=torch.float64)
    magnitude[:, :8, :8] = 0.0  # an empty cell
    bins = torch.randint(0, HOG_BINS, (6, 24, 40), generator=g)
    return magnitude.to(device), bins.to(device)


def test_cell_histograms_scatter_equals_the_masked_pools_and_a_hand_count():
    """The CPU path (one scatter-add) and the CUDA path (9 masked average-pools) give the same
    histograms, in float64 to rounding; one cell is also counted by hand."""
    magnitude, bins = _magnitude_and_bins("cpu")
    fast, pools = cell_histograms(magnitude, bins, scatter=True), cell_histograms(magnitude, bins, scatter=False)
    assert fast.shape == pools.shape == (6, HOG_BINS, 3, 5)
    torch.testing.assert_close(fast, pools, atol=1e-12, rtol=0)
    assert torch.equal(cell_histograms(magnitude, bins), fast)  # the default off CUDA
    cell_mag, cell_bins = magnitude[2, 8:16, 16:24], bins[2, 8:16, 16:24]  # cell (1, 2) of row 2
    hand = torch.stack([cell_mag[cell_bins == b].sum() / 64 for b in range(HOG_BINS)])
    torch.testing.assert_close(fast[2, :, 1, 2], hand, atol=1e-12, rtol=0)
    assert fast[:, :, 0, 0].abs().sum() == 0


def test_a_nan_pixel_gives_nan_in_its_cell_only_and_no_index_error():
    """A NaN pixel has no orientation: its cell's histogram (that channel) is NaN, which the loss's
    guard then skips as a bad target, and every other cell is unchanged. The pixel (12, 20) and the
    neighbours whose central differences read it all lie in cell (1, 2)."""
    images = torch.from_numpy(_photo(32, 32)).permute(2, 0, 1)[None].float()
    clean = hog_cells(images)  # (1, 3, 9, 4, 4)
    images[0, 1, 12, 20] = float("nan")
    dirty = hog_cells(images)
    expected = torch.zeros_like(dirty, dtype=torch.bool)
    expected[0, 1, :, 1, 2] = True
    assert torch.equal(torch.isnan(dirty), expected)
    assert torch.equal(dirty[~expected], clean[~expected])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cell_histograms_on_cuda_use_the_pools_and_match_cpu():
    """CPU twin: test_cell_histograms_scatter_equals_the_masked_pools_and_a_hand_count."""
    magnitude, bins = _magnitude_and_bins("cuda")
    on_cuda = cell_histograms(magnitude, bins)
    torch.testing.assert_close(on_cuda, cell_histograms(magnitude, bins, scatter=False), atol=0, rtol=0)
    torch.testing.assert_close(on_cuda.cpu(), cell_histograms(magnitude.cpu(), bins.cpu()), atol=1e-12, rtol=0)


def test_hog_teacher_layout_and_invariances():
    """(B, N, C) with C = 4 cells x 3 channels x 9 bins at p = 16; each cell's histogram has unit
    L2 norm per channel; a brightness shift and a contrast scale per channel change nothing."""
    images = torch.from_numpy(_photo(64, 96)).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    t = build_teacher("hog", 3, "random", 16, 64)
    out = t(images)  # (2, 24, 108)
    assert out.shape == (2, (64 // 16) * (96 // 16), 108) and t.channels == 108 == hog_channels(16)
    assert t.stride == 8 and t.num_patches == 16
    norms = out.reshape(2, 24, 4, 3, 9).norm(dim=-1)  # per (image, patch, cell, channel)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    scaled = images * torch.tensor([0.5, 2.0, 1.5]).view(1, 3, 1, 1) + 0.3
    torch.testing.assert_close(t(scaled), out, atol=1e-4, rtol=0)
    # patch (row 1, col 2) of image 0 = the 4 cells (2..3, 4..5) of hog_cells, (cell row, cell col, c, bin)
    cells = hog_cells(images)[0]  # (3, 9, 8, 12)
    hand = cells[:, :, 2:4, 4:6].permute(2, 3, 0, 1).reshape(-1)
    torch.testing.assert_close(out[0, 1 * 6 + 2], hand)


def test_hog_rejects_patch_sizes_that_do_not_tile_cells():
    with pytest.raises(ValueError, match="multiple of 8"):
        WeightFreeTeacher("hog", 14, 224)


def test_pixel_teacher_is_mae_patchify_then_per_patch_norm():
    """By hand, MAE style: patch (i, j) is images[:, :, i p:(i+1) p, j p:(j+1) p] read as (p, q, c);
    the loss's per-patch layer norm then gives MAE's norm_pix target."""
    p, B = 4, 2
    images = torch.randn(B, 3, 3 * p + 1, 2 * p + 3)  # ragged sides: cropped like the patch embedding
    t = build_teacher("pixels", 3, "", p, 12)
    out = t(images)  # (B, 6, 48)
    assert out.shape == (B, 6, p * p * 3) and t.channels == 48 and t.stride == p
    for b in range(B):
        for i in range(3):
            for j in range(2):
                patch = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (3, p, q)
                hand = torch.stack([patch[c, y, x] for y in range(p) for x in range(p) for c in range(3)])
                torch.testing.assert_close(out[b, i * 2 + j], hand, atol=0, rtol=0)
                normed = (hand - hand.mean()) / (hand.var(unbiased=False) + 1e-6).sqrt()
                torch.testing.assert_close(F.layer_norm(out[b, i * 2 + j], (48,), eps=1e-6), normed)
    # MAE's own patchify (models_mae.py), verbatim in spirit: reshape + einsum('nchpwq->nhwpqc')
    x = images[..., :3 * p, :2 * p].reshape(B, 3, 3, p, 2, p)
    mae = torch.einsum("nchpwq->nhwpqc", x).reshape(B, 6, p * p * 3)
    torch.testing.assert_close(patchify(images, p), mae, atol=0, rtol=0)


def test_weights_do_not_apply_to_weight_free_teachers(caplog):
    with caplog.at_level("WARNING", logger="img2vec.teacher"):
        build_teacher("pixels", 3, "/some/r50.pth", 16, 32)
    lines = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="img2vec.teacher"):
        build_teacher("hog", 3, "random", 16, 32)
    assert not [r for r in caplog.records if "does not apply" in r.getMessage()]
