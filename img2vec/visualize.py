"""Show what a pretrained student gets right: input, mask, and per-patch cosine similarity to the target.

    python -m img2vec.visualize --encoder RUN_DIR[/checkpoints/<tag>] --image_paths a.png b.jpg ... [--output_dir DIR]

For each image, one PNG (DIR/<image name>.png) with three panels:
    input       the image as the student sees it (resized, center-cropped)
    mask        the visible patches; masked ones grey (random masking at the run's mask ratio)
    cos sim     per masked patch, cosine similarity between the student's prediction and the
                layer-normed teacher feature it regresses (what the loss scores): 1 = right
                direction, 0 = unrelated; visible patches are left blank (the loss ignores them)
The title of the last panel gives the mean over masked patches.

Needs a training checkpoint (the decoder and head are not in encoder.safetensors); the
teacher is rebuilt from the run's config.yaml (a random teacher from the same seed).
"""
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

from img2vec.checkpoint import consolidated_fp32_state_dict, frozen_parameters
from img2vec.eval.common import eval_transform, find_checkpoint
from img2vec.config import run_config
from img2vec.masking import random_masking
from img2vec.runtime import build_student_from_config, build_teacher


def load_run(checkpoint: str, trust: bool = False):
    """(student, teacher, run Config) of a run folder or checkpoint folder; both eval, fp32, CPU."""
    ref = find_checkpoint(checkpoint)
    if ref is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint at {checkpoint}: visualize needs a run folder or "
                                f"run/checkpoints/<tag> (encoder.safetensors lacks the decoder)")
    cfg = run_config(os.path.join(ref.run_dir, "config.yaml"))
    teacher = build_teacher(cfg)
    student = build_student_from_config(cfg, teacher.channels)
    state = consolidated_fp32_state_dict(ref.run_dir, ref.tag, frozen_parameters(student), trust)
    student.load_state_dict(state, strict=True)
    return student.eval(), teacher.eval(), cfg


@torch.no_grad()
def patch_cosine(student, teacher, images: torch.Tensor, mask_ratio: float, eps: float, seed: int):
    """images (B, 3, H, W) -> cos (B, N) of prediction vs layer-normed target, masked (B, N) bool."""
    B, N = images.shape[0], student.encoder.num_patches
    mask = random_masking(B, N, mask_ratio, generator=torch.Generator().manual_seed(seed))
    pred = student(images, mask.ids_keep, mask.ids_restore)  # (B, N, C)
    target = teacher(images)  # (B, N, C)
    target = F.layer_norm(target, target.shape[-1:], eps=eps)  # what the loss regresses
    cos = F.cosine_similarity(pred, target, dim=-1)  # (B, N)
    masked = torch.zeros(B, N, dtype=torch.bool).scatter_(1, mask.ids_masked, True)  # (B, N)
    return cos, masked


def render(image: torch.Tensor, cos: torch.Tensor, masked: torch.Tensor, grid: int, path: str, title: str) -> None:
    """One row of three panels for image (3, H, W) normalized, cos (N,), masked (N,) -> PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(image, cos, masked, grid, title, plt)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(image: torch.Tensor, cos: torch.Tensor, masked: torch.Tensor, grid: int, title: str, plt):
    """The figure of render(): input, mask, and the per-patch cosine map with a labelled colour bar."""
    import numpy as np

    from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    H = rgb.shape[0]
    p = H // grid
    cell = masked.view(grid, grid).numpy()  # (g, g) True = masked
    pixel_mask = np.kron(cell, np.ones((p, p)))[..., None].astype(bool)  # (H, W, 1)
    shown = np.where(pixel_mask, 0.5, rgb)
    heat = np.where(cell, cos.view(grid, grid).numpy(), np.nan)  # (g, g), blank where visible
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("input")
    axes[1].imshow(shown, interpolation="nearest")
    axes[1].set_title(f"mask ({int(cell.sum())}/{cell.size} masked, grey)")
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="white")  # visible patches: blank
    im = axes[2].imshow(heat, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    axes[2].set_title(f"cos(pred, target), mean {np.nanmean(heat):.2f}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    bar.set_label("cosine similarity, masked patches\n(1 = right direction, 0 = unrelated)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {' '.join(str(e).split())}") from None


def visualize(checkpoint: str, image_paths: list[str], out_dir: str, seed: int = 0,
              mask_ratio: float | None = None, trust: bool = False) -> list[str]:
    """Write one PNG per image into out_dir; return their paths."""
    student, teacher, cfg = load_run(checkpoint, trust)
    transform = eval_transform(cfg.image_size, crop_pct=1.0)  # show every patch of the image
    images = torch.stack([transform(_open_rgb(p)) for p in image_paths])  # (B, 3, H, W)
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    cos, masked = patch_cosine(student, teacher, images, ratio, cfg.loss_eps, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image_path in enumerate(image_paths):
        name = os.path.splitext(os.path.basename(image_path))[0]
        path = os.path.join(out_dir, f"{name}.png")
        render(images[i], cos[i], masked[i], student.encoder.grid, path,
               f"{os.path.basename(image_path)}  |  {checkpoint}")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from img2vec.config import OneLineParser, option_names

    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="a run folder (latest checkpoint) or run/checkpoints/<tag>")
    parser.add_argument("--trust_checkpoint", "--trust-checkpoint", action="store_true",
                        help="allow checkpoint pickles that would run code (only for files you trust)")
    parser.add_argument(*option_names("image_paths"), nargs="+", required=True, help="image files")
    parser.add_argument(*option_names("output_dir"), default="visualizations", help="folder for one PNG per image")
    parser.add_argument(*option_names("mask_ratio"), type=float, default=None, help="default: the run's mask_ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    args = parser.parse_args(argv)
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        parser.error(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    missing = [p for p in args.image_paths if not os.path.isfile(p)]
    if missing:
        print(f"error: image not found: {missing[0]}", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation chatter: stdout is the paths
            paths = visualize(args.encoder, args.image_paths, args.output_dir, args.seed, args.mask_ratio,
                              args.trust_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
