"""How high can the collapse probe's div_pred / div_target go? A linear predictor from visible context.

    python bench/target_predictability.py [--teacher hog --teacher pixels] [--image_size 96] [--mask_ratio 0.5]

The student sees the visible patches and regresses the layer-normed targets of the masked ones;
the collapse probe (img2vec.token_diversity.collapse_probe) compares the token diversity of its
predictions with that of the targets. A prediction that is right on average shrinks towards the
mean wherever the target is unpredictable, so its diversity is lower than the targets' even
when nothing has collapsed. This script measures that ceiling on real images, without training:

    targets   the teacher's (B, N, C) on center crops of the sample images (as `python -m
              img2vec.diversity` reads them), layer-normed per patch as the loss does;
    masks     img2vec.masking.random_masking at --mask_ratio, one per image (seeded);
    features  per masked patch, from visible patches only: the mean target of its visible
              4-neighbours, of its visible diagonal neighbours, of all visible patches of the
              image, and the two neighbour counts;
    predictor ridge regression fitted on the first half of the images, scored on the second:
              R^2 against the targets' per-channel mean, and collapse_probe's two diversities.

It prints, per teacher and mask ratio, the regularization with the best held-out R^2 and the
weakest one: a less regularized, worse fit scores a higher ratio (it passes noise through), so
the ratio is a collapse alarm, not a measure of learning.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from img2vec.diversity import _default_stage, list_images, load_center_crop
from img2vec.masking import random_masking
from img2vec.teacher import build_teacher
from img2vec.token_diversity import collapse_probe

LAMBDAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)


def neighbour_means(targets: torch.Tensor, visible: torch.Tensor, grid: int) -> torch.Tensor:
    """targets (B, N, C) layer-normed, visible (B, N) bool -> features (B, N, 3 C + 2) from visible
    patches only: mean of the visible 4-neighbours, of the visible diagonal ones, of all visible
    patches, then the two neighbour counts."""
    B, N, C = targets.shape
    t = (targets * visible[..., None]).reshape(B, grid, grid, C)
    v = visible.float().reshape(B, grid, grid, 1)
    pad_t, pad_v = F.pad(t, (0, 0, 1, 1, 1, 1)), F.pad(v, (0, 0, 1, 1, 1, 1))  # zero border

    def gather(offsets):
        s = sum(pad_t[:, 1 + dy:1 + dy + grid, 1 + dx:1 + dx + grid] for dy, dx in offsets)
        n = sum(pad_v[:, 1 + dy:1 + dy + grid, 1 + dx:1 + dx + grid] for dy, dx in offsets)
        return (s / n.clamp_min(1)).reshape(B, N, C), n.reshape(B, N, 1)

    side, n_side = gather([(-1, 0), (1, 0), (0, -1), (0, 1)])
    diag, n_diag = gather([(-1, -1), (-1, 1), (1, -1), (1, 1)])
    image = (t.sum((1, 2)) / v.sum((1, 2)).clamp_min(1))[:, None].expand(B, N, C)
    return torch.cat([side, diag, image, n_side / 4, n_diag / 4], -1)


def ridge_rows(targets: torch.Tensor, mask_ratio: float, grid: int, seed: int) -> list[dict]:
    """One row per regularization: held-out R^2 and collapse_probe's div_pred, div_target."""
    B, N, C = targets.shape
    mask = random_masking(B, N, mask_ratio, generator=torch.Generator().manual_seed(seed))
    visible = torch.zeros(B, N, dtype=torch.bool).scatter_(1, mask.ids_keep, True)
    x = torch.cat([neighbour_means(targets, visible, grid), torch.ones(B, N, 1)], -1).double()  # (B, N, F)
    rows_of = lambda a: torch.gather(a, 1, mask.ids_masked[..., None].expand(-1, -1, a.shape[-1]))  # (B, M, .)
    xm, ym = rows_of(x), rows_of(targets.double())
    half = B // 2
    xtr, ytr = xm[:half].reshape(-1, x.shape[-1]), ym[:half].reshape(-1, C)
    gram, rhs = xtr.T @ xtr, xtr.T @ ytr
    y_test = ym[half:]
    spread = (y_test - y_test.mean((0, 1))).square().mean()
    rows = []
    for lam in LAMBDAS:
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)
        pred = xm[half:] @ w  # (B - half, M, C)
        r2 = 1.0 - ((pred - y_test).square().mean() / spread).item()
        probe = collapse_probe(pred.float(), targets[half:], mask.ids_masked[half:])
        rows.append({"lambda": lam, "r2": r2, "div_pred": probe["div_pred"].item(),
                     "div_target": probe["div_target"].item()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/target_predictability.py", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", action="append", help="pixels, hog or a timm name (random weights); repeat "
                                                      "(default: hog and pixels)")
    p.add_argument("--image_size", type=int, default=96, help="center-crop side (the embedded default's)")
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--mask_ratio", type=float, action="append", help="repeat (default: 0.25, 0.5, 0.75)")
    p.add_argument("--num_images", type=int, default=256, help="of the sample set (or --data_path)")
    p.add_argument("--data_path", default="", help="ImageFolder dir or file list ('' = the bundled sample images)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    grid = args.image_size // args.patch_size
    paths = list_images(args.data_path, args.num_images, args.seed)
    images = torch.stack([load_center_crop(path, args.image_size) for path in paths])  # (B, 3, S, S)
    print(f"{len(paths)} images at {args.image_size} px, patch {args.patch_size} ({grid}x{grid}); ridge on the "
          f"first {len(paths) // 2}, scored on the rest")
    print(f"{'teacher':10s} {'mask':>5s} {'lambda':>7s} {'R^2':>7s} {'div_pred':>9s} {'div_target':>10s} {'ratio':>6s}")
    for name in args.teacher or ["hog", "pixels"]:
        stage = _default_stage(name, args.patch_size)  # as `python -m img2vec.diversity` picks it
        teacher = build_teacher(name, stage, "random", args.patch_size, args.image_size, seed=args.seed)
        with torch.no_grad():
            targets = torch.cat([teacher(images[i:i + 64]) for i in range(0, len(images), 64)])  # (B, N, C)
        targets = F.layer_norm(targets.float(), (targets.shape[-1],), eps=1e-6)  # as the loss sees them
        for ratio in args.mask_ratio or [0.25, 0.5, 0.75]:
            rows = ridge_rows(targets, ratio, grid, args.seed)
            best = max(rows, key=lambda r: r["r2"])
            for label, r in (("best", best), ("weakest", rows[0])):
                print(f"{name:10s} {ratio:5.2f} {r['lambda']:7g} {r['r2']:7.3f} {r['div_pred']:9.3f} "
                      f"{r['div_target']:10.3f} {r['div_pred'] / r['div_target']:6.3f}  ({label} lambda)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
