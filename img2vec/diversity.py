"""Rank teachers by the token diversity of their patch features (measures: img2vec.token_diversity).

    python -m img2vec.diversity --teacher hog --teacher pixels --teacher resnet50 --teacher_stage 3 \\
        --teacher_weights r50.pth --teacher vit_small_patch16_224 --teacher_stage 8 --num_images 256

Teachers: the weight-free `pixels` and `hog` (img2vec/hog.py) or any timm model name. Unreadable
images are skipped as pretraining skips them (named once in the log) and counted in the report.
"""
import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from img2vec.hog import WEIGHT_FREE_TEACHERS
from img2vec.token_diversity import effective_rank, token_diversity

log = logging.getLogger("img2vec.diversity")


class _TeacherArg(argparse.Action):
    """--teacher starts a new entry; --teacher_stage / --teacher_weights after it belong to it."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = getattr(namespace, "entries", None) or []
        if self.dest == "teacher":
            entries.append({"teacher": value, "stages": [], "weights": None})
        elif not entries:
            parser.error(f"{option_string} must follow a --teacher")
        elif self.dest == "teacher_stage":
            entries[-1]["stages"] += [s for s in value.split(",") if s]
        else:
            if entries[-1]["weights"] is not None:
                parser.error(f"--teacher_weights given twice for --teacher {entries[-1]['teacher']}")
            entries[-1]["weights"] = value
        namespace.entries = entries


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m img2vec.diversity", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rank teachers (and stages of one teacher) by the token diversity of their "
                    "features on the same images: 1 - mean pairwise cosine among an image's "
                    "tokens (higher = more diverse), and the effective rank of its tokens.")
    p.add_argument("--teacher", action=_TeacherArg, metavar="NAME", default=argparse.SUPPRESS,
                   help="pixels, hog, or a timm model name (resnet50, vit_small_patch16_224, ...); repeat "
                        "for more (default: resnet50)")
    p.add_argument("--teacher_stage", "--teacher-stage", action=_TeacherArg, metavar="S", default=argparse.SUPPRESS,
                   help="stage index or module name of the preceding --teacher (CNN: 3 or layer3; ViT: block "
                        "k, 0-based); repeat or comma-separate for several (default: CNN the deepest stage "
                        "with stride <= patch size, ViT the last block; pixels/hog have none)")
    p.add_argument("--teacher_weights", "--teacher-weights", action=_TeacherArg, metavar="PATH",
                   default=argparse.SUPPRESS,
                   help="checkpoint of the preceding --teacher (.pth/.safetensors; DINO, MoCo v3, torchvision, "
                        "timm layouts) (default: random init, with a warning; pixels/hog have no weights)")
    p.add_argument("--data_path", "--data-path", default="",
                   help="ImageFolder dir or file list ('' = the bundled sample images)")
    p.add_argument("--num_images", "--num-images", type=int, default=256, help="images to average over (seeded subset)")
    p.add_argument("--image_size", "--image-size", type=int, default=224, help="center-crop side in pixels")
    p.add_argument("--patch_size", "--patch-size", type=int, default=16, help="the student's patch size (token grid)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per teacher forward")
    p.add_argument("--output_dir", "--output-dir", default="runs/diversity", help="folder for diversity.json and .png")
    p.add_argument("--seed", type=int, default=0, help="image subset and random-init seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where teachers run")
    args = p.parse_args(argv)
    args.entries = getattr(args, "entries", None) or [{"teacher": "resnet50", "stages": [], "weights": None}]
    if args.num_images < 1 or args.batch_size < 1 or args.image_size < args.patch_size:
        p.error("--num_images and --batch_size must be >= 1, --image_size >= --patch_size")
    return args


def _default_stage(name: str, patch_size: int) -> int:
    """CNN: deepest stage with stride <= p (resnet50, p=16: 3); ViT: its last block; pixels/hog: 0."""
    import timm
    from img2vec.teacher import _is_vit, validate_teacher_stage

    if name in WEIGHT_FREE_TEACHERS:
        return 0
    validate_teacher_stage(name, 0)  # an unknown name fails here, in one line
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    strides = [d["reduction"] for d in model.feature_info]
    if _is_vit(model):
        return len(strides) - 1
    return max([i for i, s in enumerate(strides) if s <= patch_size] or [0])


def data_root(data: str) -> str:
    """The data set to read: `data`, or the bundled sample images when it is ''."""
    from dataloading import sample_dataset_dir

    return data or str(sample_dataset_dir())


def image_subset(total: int, count: int, seed: int, root: str) -> list[int]:
    """Indices of `count` of the `total` images under root: a seeded subset, in file order."""
    if count < total:
        return np.sort(np.random.default_rng(seed).choice(total, count, replace=False)).tolist()
    if count > total:
        log.warning("--num_images %d but %s holds %d images: using all of them", count, root, total)
    return list(range(total))


def list_images(data: str, count: int, seed: int) -> list:
    """`count` image paths of an ImageFolder tree or file list: a seeded subset, in file order."""
    from dataloading import ImageDataset

    root = data_root(data)
    paths = ImageDataset(root, image_size=8).paths  # listing only: the augmentation is not used
    return [paths[i] for i in image_subset(len(paths), count, seed, root)]


def load_center_crop(path, image_size: int) -> torch.Tensor:
    """The deterministic eval view of the image file at `path` (short side to image_size, bicubic,
    center crop, ImageNet normalization): (3, image_size, image_size) fp32."""
    from PIL import Image

    from img2vec.eval.common import eval_transform

    with Image.open(path) as im:
        return eval_transform(image_size, crop_pct=1.0)(im.convert("RGB"))


def _resampling(kind: str, stride: int, patch: int) -> str:
    if kind == "hog":
        return f"{(patch // stride) ** 2} cells concatenated"
    return "none" if stride == patch else ("avg-pool" if stride < patch else "bilinear")


def measure(args: argparse.Namespace) -> dict:
    """Run every teacher/stage on the same images; return the JSON-able report (rows ranked)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm  # a log line between bar updates gets a line of its own

    from dataloading.datasets import SkipLog
    from dataloading.sources import DataError
    from img2vec.eval.common import ReadableImages, collate_readable, eval_transform, readable_batches
    from img2vec.teacher import build_teacher

    device = torch.device(args.device)
    g = args.image_size // args.patch_size
    teachers = []
    for e in args.entries:
        weights = "none" if e["teacher"] in WEIGHT_FREE_TEACHERS else e["weights"] or "random"  # as measured
        for stage in e["stages"] or [_default_stage(e["teacher"], args.patch_size)]:
            # Only weights the user passed: build_teacher warns that a weight-free teacher ignores them.
            t = build_teacher(e["teacher"], stage, e["weights"] or "", args.patch_size, args.image_size,
                              seed=args.seed)
            teachers.append((e["teacher"], weights, t.to(device)))
    root = data_root(args.data_path)
    files = ReadableImages(root, eval_transform(args.image_size, crop_pct=1.0))  # unreadable files left out
    chosen = image_subset(len(files), args.num_images, args.seed, root)
    loader = DataLoader(Subset(files, chosen), args.batch_size, num_workers=0, collate_fn=collate_readable)
    skips = SkipLog()  # each unreadable file named once in the log (logger img2vec.data)
    per_image = [{"diversity": [], "effective_rank": []} for _ in teachers]
    used = 0  # images measured: the chosen ones that could be read
    start = time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(chosen), unit="img", desc="token diversity", file=sys.stderr) as bar:
        for images, _ in readable_batches(loader, skips):
            images = images.to(device)  # (B, 3, S, S)
            for (_, _, t), acc in zip(teachers, per_image):
                feats = t(images)  # (B, N, C) fp32 on the student grid
                acc["diversity"] += token_diversity(feats, reduction="none").tolist()
                acc["effective_rank"] += effective_rank(feats, reduction="none").tolist()
            used += len(images)
            bar.update(len(images))
    if not used:
        raise DataError(f"none of the {len(chosen)} images chosen from {root} is readable; "
                        f"python -m dataloading.verify --full {root} says why")
    rows = []
    for (name, weights, t), acc in zip(teachers, per_image):
        d, r = np.asarray(acc["diversity"]), np.asarray(acc["effective_rank"])
        rows.append({
            "teacher": name, "stage": t.info.index, "module": t.info.module, "kind": t.info.kind,
            "weights": weights, "channels": t.channels, "stride": t.stride,
            "resampling": _resampling(t.info.kind, t.stride, args.patch_size),
            "diversity_mean": float(d.mean()), "diversity_std": float(d.std()),
            "effective_rank_mean": float(r.mean()), "effective_rank_std": float(r.std()),
            "effective_rank_max": min(g * g, t.channels),
        })
    rows.sort(key=lambda r: -r["diversity_mean"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return {
        "definition": "diversity = 1 - mean_{i!=j} cos(f_i, f_j) over an image's tokens, mean over "
                      "images, range [0, 2]; effective_rank = exp(entropy of normalized singular values)",
        "data": args.data_path or "bundled sample images", "images": used, "skipped": len(chosen) - used,
        "image_size": args.image_size, "patch_size": args.patch_size, "grid": [g, g],
        "seconds": round(time.perf_counter() - start, 1), "results": rows,
    }


def format_table(report: dict) -> str:
    """A fixed-width table, one row per teacher/stage, best (most diverse) first."""
    head = ("rank", "teacher", "stage", "weights", "C", "stride", "diversity", "eff. rank / max")
    lines = [(str(r["rank"]), r["teacher"],
              r["module"] if r["kind"] in WEIGHT_FREE_TEACHERS else f"{r['stage']} ({r['module']})",
              os.path.basename(r["weights"]), str(r["channels"]),
              f"{r['stride']} {r['resampling']}",
              f"{r['diversity_mean']:.3f} ± {r['diversity_std']:.3f}",
              f"{r['effective_rank_mean']:.1f} / {r['effective_rank_max']}")
             for r in report["results"]]
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    g = report["grid"]
    skipped = f", {report['skipped']} unreadable skipped" if report.get("skipped") else ""
    title = (f"token diversity on {report['images']} images ({report['data']}{skipped}), "
             f"{report['image_size']} px, patch {report['patch_size']} -> {g[0]}x{g[1]} tokens")
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def plot(report: dict, path: str) -> None:
    """Horizontal bars, best on top: diversity (± std over images) and effective rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"][::-1]  # matplotlib draws bottom-up: best at the top
    labels = [f"{r['teacher']}\n{r['module']} (C={r['channels']})" if r["kind"] in WEIGHT_FREE_TEACHERS else
              f"{r['teacher']}\n{r['module']} (stage {r['stage']}, C={r['channels']})"
              + ("\nrandom init" if r["weights"] == "random" else "") for r in rows]
    y = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.75 * len(rows)), sharey=True)
    d = [r["diversity_mean"] for r in rows]
    a.barh(y, d, xerr=[r["diversity_std"] for r in rows], color="tab:blue", capsize=3)
    a.set_xlim(0, max(1.0, max(d) * 1.25))
    a.set_xlabel("token diversity = 1 - mean pairwise cosine\n(higher = more diverse; bar: ± std over images)")
    for yi, v in zip(y, d):
        a.text(v + 0.01, yi + 0.25, f"{v:.3f}", va="center", fontsize=9)
    e = [r["effective_rank_mean"] for r in rows]
    b.barh(y, e, color="tab:orange")
    b.set_xlim(0, max(e) * 1.3 if max(e) > 0 else 1)
    b.set_xlabel("effective rank of an image's tokens\n(label: mean / max possible = min(N, C))")
    for yi, r in zip(y, rows):
        b.text(r["effective_rank_mean"], yi, f" {r['effective_rank_mean']:.1f} / {r['effective_rank_max']}",
               va="center", fontsize=9)
    a.set_yticks(y, labels, fontsize=9)
    g = report["grid"]
    fig.suptitle(f"Teacher token diversity: {report['images']} images, {report['image_size']} px, "
                 f"patch {report['patch_size']} ({g[0]}x{g[1]} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: "list[str] | None" = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        report = measure(args)
    except (ValueError, FileNotFoundError) as e:  # bad teacher / stage / weights / data: one line
        log.error("%s", e)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "diversity.json")
    png_path = os.path.join(args.output_dir, "diversity.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, png_path)
    print(format_table(report))
    print(f"wrote {json_path} and {png_path} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
