"""Linear probe (MAE): BatchNorm without affine + one linear layer on frozen encoder features.

    python -m img2vec.eval.linear_probe --encoder RUN_DIR_or_encoder.safetensors --data_path ROOT \
        [--epochs 90] [--optimizer sgd|lars] [--base_lr 0.1] [--pool cls]

Recipe of MAE's main_linprobe.py (BatchNorm1d(D, affine=False) + Linear(D, classes), no weight
decay, lr = base_lr * batch / 256, warmup then half-cosine), with SGD as the default optimizer and
features cached once per split; docs/evaluation.md says why.
Prints `linear probe top-1 90.40%  top-5 99.33%` (val, after the last epoch) and writes
linear_probe.json (linear_probe_random_init.json for --init random) beside the encoder or in
--output_dir: {"top1", "top5", "train_top1", ...} in percent (img2vec/eval/results.py: where).
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataloading.datasets import SkipLog
from img2vec.eval.common import (POOLS, collate_readable, eval_transform, extract_features, labeled_split,
                                 readable_batches)
from img2vec.eval.knn import topk_accuracy
from img2vec.eval.results import accuracy_line, eval_parser, images_note, open_encoder_and_splits, publish, rounded


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in MAE's util/lars.py: SGD + momentum with a per-tensor trust
    ratio ||w|| / ||g|| on weight matrices; biases and norm parameters (ndim <= 1) step plainly."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


class LinearHead(nn.Module):
    """features (B, D) -> logits (B, classes): BatchNorm1d(affine=False) then Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.norm(x))


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                       num_classes: int, epochs: int = 90, batch_size: int = 256, blr: float = 0.1,
                       optimizer: str = "sgd", weight_decay: float = 0.0, warmup_epochs: int = 10,
                       seed: int = 0) -> dict[str, float]:
    """Train the head on cached features (n, D); return val {"top1", "top5"} (percent) and train top1."""
    torch.manual_seed(seed)
    head = LinearHead(train_x.shape[1], num_classes)
    lr = blr * batch_size / 256
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'lars' or 'sgd', got {optimizer!r}")
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        result = topk_accuracy(head(val_x), val_y)
        result["train_top1"] = topk_accuracy(head(train_x), train_y, (1,))["top1"]
    return result


def main(argv: list[str] | None = None) -> int:
    from img2vec.config import option_names

    parser = eval_parser(__doc__.split("\n")[0])
    parser.add_argument("--pool", choices=POOLS, default="cls", help="image feature: class token or mean of patches")
    parser.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                        help="random: the same architecture at a seeded random init (the baseline)")
    parser.add_argument("--epochs", type=int, default=90, help="passes over the cached train features")
    parser.add_argument(*option_names("warmup_epochs"), type=int, default=10, help="epochs of linear lr warmup")
    parser.add_argument(*option_names("batch_size"), type=int, default=256, help="features per head step")
    parser.add_argument(*option_names("base_lr"), type=float, default=0.1, help="lr = base_lr * batch_size / 256")
    parser.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd", help="SGD momentum 0.9, or LARS")
    parser.add_argument(*option_names("weight_decay"), type=float, default=0.0, help="weight decay of the head")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init and the head")
    parser.add_argument(*option_names("output_dir"), default=None,
                        help="folder for linear_probe.json; default: beside the encoder (its folder or run folder)")
    args = parser.parse_args(argv)
    finite = all(math.isfinite(x) for x in (args.base_lr, args.weight_decay))
    if min(args.epochs, args.batch_size) <= 0 or min(args.seed, args.warmup_epochs) < 0 or not finite \
            or args.base_lr <= 0 or args.weight_decay < 0:
        parser.error("--epochs, --batch_size and --base_lr must be > 0 (finite); --seed, --warmup_epochs and "
                     "--weight_decay >= 0")
    if args.output_dir and os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file: pass a folder")
    try:
        encoder, train_dir, val_dir = open_encoder_and_splits(args)
        transform = eval_transform(encoder.image_size, args.crop_pct)
        splits = {"train": labeled_split(train_dir, transform), "val": labeled_split(val_dir, transform)}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    skips = SkipLog()  # an unreadable file is named once in the log (logger img2vec.data)
    loaders = [DataLoader(split, 256, num_workers=0, collate_fn=collate_readable) for split in splits.values()]
    (train_x, train_y), (val_x, val_y) = (extract_features(encoder, readable_batches(loader, skips), args.pool, device)
                                          for loader in loaders)
    result = train_linear_probe(train_x, train_y, val_x, val_y, len(splits["train"].classes), args.epochs,
                                args.batch_size, args.base_lr, args.optimizer, args.weight_decay, args.warmup_epochs,
                                args.seed)
    images = {"train": len(train_y), "val": len(val_y)}
    skipped = {name: len(split) - images[name] for name, split in splits.items()}  # each file scored or skipped
    label = "linear probe" if args.init == "pretrained" else "linear probe (random init)"
    print(f"{accuracy_line(label, result)}  (train top-1 {result['train_top1']:.2f}%; pool {args.pool}, "
          f"{args.optimizer}, {args.epochs} epochs; {images_note(images, skipped)})")
    return publish(args, "linear_probe", {
        "eval": "linear_probe", **rounded(result), "train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir),
        "train_images": images["train"], "val_images": images["val"], "train_skipped": skipped["train"],
        "val_skipped": skipped["val"], "pool": args.pool, "optimizer": args.optimizer,
        "epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size,
        "base_lr": args.base_lr, "weight_decay": args.weight_decay})


if __name__ == "__main__":
    sys.exit(main())
