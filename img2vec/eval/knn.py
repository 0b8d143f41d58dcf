"""Weighted k-nearest-neighbour classification on frozen encoder features (DINO's kNN).

    python -m img2vec.eval.knn --encoder RUN_DIR_or_encoder.safetensors --data_path ROOT [--k 20] [--pool cls]

For each val image: cosine similarity to every train feature, its k nearest train images
vote for their class with weight exp(sim / T) (T = 0.07), the class with most weight
wins. Prints `knn top-1 70.89%  top-5 97.33%` and writes knn.json (knn_random_init.json for
--init random) beside the encoder or in --output_dir: {"top1", "top5", ...} in percent
(img2vec/eval/results.py says where exactly).

`KnnMonitor` is the same evaluation as an in-training metric on a small labeled split;
train.py calls it every `eval_every` steps.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from dataloading.datasets import SkipLog
from img2vec.eval.common import (POOLS, collate_readable, eval_transform, extract_features, labeled_split,
                                 readable_batches)
from img2vec.pretrained_cfg import EVAL_CROP_PCT
from img2vec.eval.results import accuracy_line, eval_parser, images_note, open_encoder_and_splits, publish, rounded


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes) of the queries; feats (n, D) / (Q, D), any scale (normalized here).

    score[q, c] = sum over the k nearest train images i of class c of exp(cos(q, i) / T).
    """
    train = F.normalize(train_feats.float(), dim=1)  # (n, D)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        query = F.normalize(query_feats[start:start + chunk].float(), dim=1)  # (q, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (q, k) each
        weights = (sim / temperature).exp()  # (q, k)
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        out.append(votes.scatter_add_(1, train_labels.to(idx.device)[idx], weights))  # (q, C)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} of scores (Q, C) against labels (Q,); k capped at C."""
    ranked = scores.argsort(dim=1, descending=True)  # (Q, C)
    hits = ranked == labels.to(ranked.device).unsqueeze(1)  # (Q, C)
    return {f"top{k}": 100.0 * hits[:, :min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k, temperature)
    return topk_accuracy(scores, val_labels)


class KnnMonitor:
    """kNN top-1/top-5 of an encoder on a fixed labeled split, cheap enough to call during training.

    Every rank must call it (under ZeRO-3 the encoder's forward gathers parameters, a
    collective); each rank computes the same numbers, rank 0 logs them. `max_train` /
    `max_val` take the first images of a fixed shuffle, so the subset never changes.
    Unreadable files are left out and named once in the log (logger img2vec.data); after an
    evaluation, `images` and `skipped` hold {"train": n, "val": n}: the files scored and left out.
    """

    def __init__(self, train_dir: str, val_dir: str, image_size: int, pool: str = "cls", k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256, max_train: int = 0, max_val: int = 0,
                 seed: int = 0, crop_pct: float = EVAL_CROP_PCT):
        transform = eval_transform(image_size, crop_pct)
        train, val = labeled_split(train_dir, transform), labeled_split(val_dir, transform)
        if train.classes != val.classes:
            raise ValueError(f"train and val class folders differ: {train.classes} vs {val.classes}")
        g = torch.Generator().manual_seed(seed)
        self.train = Subset(train, torch.randperm(len(train), generator=g)[:max_train or None].tolist())
        self.val = Subset(val, torch.randperm(len(val), generator=g)[:max_val or None].tolist())
        self.num_classes, self.pool, self.k, self.temperature = len(train.classes), pool, k, temperature
        self.batch_size = batch_size
        self.skips = SkipLog()  # kept across calls: an unreadable file is named once, not at every evaluation
        self.images, self.skipped = {"train": 0, "val": 0}, {"train": 0, "val": 0}

    def __call__(self, encoder: torch.nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """{"knn_top1", "knn_top5"} in percent: the names of the in-training metric (metrics.jsonl)."""
        return {f"knn_{key}": value for key, value in self.evaluate(encoder, device, dtype).items()}

    def evaluate(self, encoder: torch.nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """{"top1", "top5"} in percent, the names every evaluation's result uses."""
        device = torch.device(device)
        features = {}
        for name, split in (("train", self.train), ("val", self.val)):
            loader = DataLoader(split, self.batch_size, shuffle=False, num_workers=0, collate_fn=collate_readable)
            features[name] = extract_features(encoder, readable_batches(loader, self.skips), self.pool, device, dtype)
            self.images[name] = len(features[name][1])
            self.skipped[name] = len(split) - self.images[name]  # every file is scored or left out
        return knn_accuracy(*features["train"], *features["val"], self.num_classes, self.k, self.temperature)


def main(argv: list[str] | None = None) -> int:
    from img2vec.config import option_names

    parser = eval_parser(__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos / temperature)")
    parser.add_argument("--pool", choices=POOLS, default="cls", help="image feature: class token or mean of patches")
    parser.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                        help="random: the same architecture at a seeded random init (the baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init")
    parser.add_argument(*option_names("batch_size"), type=int, default=256, help="images per forward pass")
    parser.add_argument(*option_names("output_dir"), default=None,
                        help="folder for knn.json; default: beside the encoder (its folder or run folder)")
    args = parser.parse_args(argv)
    if args.k <= 0 or args.batch_size <= 0 or args.seed < 0 or not 0 < args.temperature < float("inf"):
        parser.error("--k and --batch_size must be > 0, --seed >= 0, --temperature a finite number > 0")
    if args.output_dir and os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file: pass a folder")
    try:
        encoder, train_dir, val_dir = open_encoder_and_splits(args)
        monitor = KnnMonitor(train_dir, val_dir, encoder.image_size, args.pool, args.k, args.temperature,
                             args.batch_size, crop_pct=args.crop_pct)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = monitor.evaluate(encoder.to(device), device)
    label = "knn" if args.init == "pretrained" else "knn (random init)"
    print(f"{accuracy_line(label, result)}  (k {args.k}, pool {args.pool}; "
          f"{images_note(monitor.images, monitor.skipped)})")
    return publish(args, "knn", {"eval": "knn", **rounded(result), "train": os.path.abspath(train_dir),
                                 "val": os.path.abspath(val_dir), "train_images": monitor.images["train"],
                                 "val_images": monitor.images["val"], "train_skipped": monitor.skipped["train"],
                                 "val_skipped": monitor.skipped["val"], "k": args.k,
                                 "temperature": args.temperature, "pool": args.pool})


if __name__ == "__main__":
    sys.exit(main())
