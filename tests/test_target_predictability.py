"""bench/target_predictability.py: the context features and the ridge ceiling behave as documented."""
import importlib.util

import torch
import torch.nn.functional as F
from train_helpers import REPO

spec = importlib.util.spec_from_file_location("target_predictability", REPO / "bench" / "target_predictability.py")
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)


def test_neighbour_means_use_visible_patches_only():
    """3x3 grid, C = 1, target = patch index; the centre's visible 4-neighbours are 1 and 7 (3 and 5
    are masked), its visible diagonals 0 and 8; the image mean is over the visible patches."""
    targets = torch.arange(9.0).reshape(1, 9, 1)
    visible = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    f = tp.neighbour_means(targets, visible, grid=3)  # (1, 9, 3 C + 2)
    assert f.shape == (1, 9, 5)
    side, diag, image, n_side, n_diag = f[0, 4]
    assert (side, diag, n_side, n_diag) == (4.0, 4.0, 0.5, 0.5)
    assert image == (0 + 1 + 7 + 8) / 4
    assert f[0, 2, 0] == 1.0 and f[0, 2, 3] == 0.25  # corner patch 2: only neighbour 1 is visible (5 is not)


def test_ridge_ceiling_is_high_for_a_predictable_target_and_low_for_noise():
    """A target that is the mean of its 4-neighbours' (smooth fields) is predicted with a high R^2 and
    a ratio near 1; independent noise per patch around a shared mean (as real targets have one) gives
    R^2 <= ~0 and a low ratio at the best lambda: the best prediction is that mean."""
    g, B, C = 8, 96, 16
    gen = torch.Generator().manual_seed(0)
    smooth = F.avg_pool2d(torch.randn(B, C, g + 4, g + 4, generator=gen), 5, 1)  # (B, C, g, g)
    smooth = F.layer_norm(smooth.permute(0, 2, 3, 1).reshape(B, g * g, C), (C,))
    mean = torch.randn(C, generator=gen)
    noise = F.layer_norm(torch.randn(B, g * g, C, generator=gen) + mean, (C,))
    best = lambda rows: max(rows, key=lambda r: r["r2"])
    s, n = best(tp.ridge_rows(smooth, 0.5, g, seed=0)), best(tp.ridge_rows(noise, 0.5, g, seed=0))
    assert s["r2"] > 0.6 and s["div_pred"] / s["div_target"] > 0.7, s
    assert n["r2"] < 0.02 and n["div_pred"] / n["div_target"] < 0.3, n
