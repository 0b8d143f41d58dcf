"""Fine-tune a pretrained encoder for classification (MAE's recipe), under DeepSpeed.

    deepspeed img2vec/finetune.py --ds_config configs/ds_zero2.json --encoder RUN_DIR --data ROOT [--key value ...]
    python img2vec/finetune.py --ds_config configs/ds_zero2.json --encoder RUN_DIR --data ROOT   # one process

The model is timm's VisionTransformer built from the encoder's timm kwargs (so what we
fine-tune is exactly what a user loads from the export), with a new linear head, drop path,
and average pooling of the patch tokens after the final norm. Recipe (MAE main_finetune.py):
AdamW (0.9, 0.999), layer-wise LR decay, lr = base_lr * batch / 256, warmup then half-cosine,
label smoothing 0.1; mixup / cutmix off by default (--mixup 0.8 --cutmix 1.0 turns them on).
`--init random` fine-tunes the same architecture from a seeded random init: the baseline.

Writes output_dir/{config.yaml, metrics.jsonl (train loss, lr; val top1/top5 per epoch),
checkpoints/ (DeepSpeed), classifier.safetensors + classifier.json (timm kwargs)}.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, fields

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

from img2vec.checkpoint import consolidated_fp32_state_dict, save_checkpoint, step_tag
from img2vec.distributed import init_distributed, seed_everything
from img2vec.ds_config import ds_precision, load_ds_config
from img2vec.optim import cosine_schedule

log = logging.getLogger("img2vec")


@dataclass
class FinetuneConfig:
    encoder: str = ""  # encoder.safetensors, a run/export folder, or run/checkpoints/<tag>
    init: str = "pretrained"  # pretrained | random (same architecture, seeded init: the baseline)
    data: str = ""  # ImageFolder root with train/ and val/
    output_dir: str = "runs/finetune"
    epochs: int = 100
    max_steps: int = 0  # > 0 overrides epochs
    warmup_epochs: float = 5.0
    base_lr: float = 1e-3  # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6
    layer_decay: float = 0.75  # lr of block i = lr * layer_decay ** (depth + 1 - (i + 1)); MAE: B 0.65, L 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha; 0 = off (MAE ImageNet: 0.8)
    cutmix: float = 0.0  # cutmix alpha; 0 = off (MAE ImageNet: 1.0)
    pool: str = "avg"  # avg (MAE) | cls
    crop_scale_min: float = 0.08  # RandomResizedCrop area fraction lower bound
    hflip: float = 0.5  # horizontal flip probability (0 for digits and text)
    num_workers: int = 2
    log_every: int = 10
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        if not self.encoder:
            raise ValueError("set --encoder (encoder.safetensors, a run folder or run/checkpoints/<tag>)")
        if not self.data or not os.path.isdir(os.path.join(self.data, "train")) or not os.path.isdir(
                os.path.join(self.data, "val")):
            raise ValueError(f"--data must be a folder with train/ and val/ ImageFolder splits, got {self.data!r}")
        if self.init not in ("pretrained", "random") or self.pool not in ("avg", "cls"):
            raise ValueError("init must be pretrained|random and pool avg|cls")
        if not 0 < self.layer_decay <= 1 or self.epochs <= 0 or self.base_lr <= 0:
            raise ValueError("layer_decay must be in (0, 1], epochs and base_lr > 0")
        return self


def load_finetune_config(yaml_path: str | None, overrides: list[str]) -> FinetuneConfig:
    """Defaults <- YAML <- `--key value` flags, typed by the dataclass fields."""
    types = {f.name: {"int": int, "float": float, "str": str}.get(f.type, f.type) for f in fields(FinetuneConfig)}
    values = {}
    if yaml_path:
        with open(yaml_path) as f:
            values.update(yaml.safe_load(f) or {})
    it = iter(overrides)
    for arg in it:
        key, eq, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or key not in types:
            raise ValueError(f"unknown argument {arg!r} (keys: see FinetuneConfig in img2vec/finetune.py)")
        values[key] = value if eq else next(it, None)
    try:
        return FinetuneConfig(**{k: types[k](v) for k, v in values.items()}).validate()
    except (TypeError, KeyError) as e:
        raise ValueError(f"bad config value: {e}") from None


# --- Model: timm VisionTransformer + layer-wise LR decay ------------------------------------


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """timm VisionTransformer with our encoder's weights (or its seeded random init) and a new head."""
    from timm.models.vision_transformer import VisionTransformer

    from img2vec.eval.common import build_encoder, load_encoder_state

    state, timm_kwargs = load_encoder_state(cfg.encoder)
    if cfg.init == "random":  # our init (xavier, sin-cos pos_embed), as the kNN baseline uses
        torch.manual_seed(cfg.seed)
        state = build_encoder(timm_kwargs).state_dict()
    kwargs = {**timm_kwargs, "num_classes": num_classes, "drop_path_rate": cfg.drop_path,
              "global_pool": "avg" if cfg.pool == "avg" else "token", "fc_norm": False}
    torch.manual_seed(cfg.seed)
    model = VisionTransformer(**kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and sorted(missing) == ["head.bias", "head.weight"], (missing, unexpected)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head
    nn.init.zeros_(model.head.bias)
    return model, kwargs


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, num_layers for the final norm and head (MAE lrd)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, one per (layer, decay or not); group["lr_scale"] = layer_decay ** (L - layer)."""
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        lid = layer_id(name, num_layers)
        group = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                    "lr_scale": layer_decay ** (num_layers - lid)})
        group["params"].append(p)
    return list(groups.values())


# --- Data ----------------------------------------------------------------------------------


def train_transform(image_size: int, crop_scale_min: float, hflip: float):
    import torchvision.transforms as T

    from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(hflip), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def evaluate(model: nn.Module, val_set, rank: int, world_size: int, device, dtype, batch: int) -> dict[str, float]:
    """Top-1/top-5 over the whole val split: rank r scores images r, r + W, ...; counts all-reduced."""
    from torch.utils.data import DataLoader, Subset

    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # top1 hits, top5 hits, images
    shard = Subset(val_set, list(range(rank, len(val_set), world_size)))
    for images, labels in DataLoader(shard, batch, num_workers=0):
        logits = model(images.to(device, dtype)).float()  # (B, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()  # (B, 5)
        hits = top5 == labels.unsqueeze(1)
        counts += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), len(labels)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)  # the sync point of an evaluation
    model.train()
    return {"val_top1": 100.0 * (counts[0] / counts[2]).item(), "val_top5": 100.0 * (counts[1] / counts[2]).item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (engine: batch, precision, ZeRO)")
    parser.add_argument("--config", default=None, help="optional YAML of FinetuneConfig keys")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_finetune_config(args.config, overrides)
    except (ValueError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    # --- Engine -------------------------------------------------------------------------------
    rank, world_size, local_rank = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ds_config = load_ds_config(args.ds_config, world_size)
    micro_batch, accum_steps = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = ds_precision(ds_config)
    seed_everything(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    # --- Model --------------------------------------------------------------------------------
    from img2vec.eval.common import eval_transform, image_folder

    val_probe = image_folder(os.path.join(cfg.data, "val"), None)
    model, timm_kwargs = build_classifier(cfg, len(val_probe.classes))
    image_size = timm_kwargs["img_size"]

    # --- Data: each rank its DistributedSampler shard of a seeded per-epoch shuffle -------------
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    train_set = image_folder(os.path.join(cfg.data, "train"), train_transform(image_size, cfg.crop_scale_min, cfg.hflip))
    val_set = image_folder(os.path.join(cfg.data, "val"), eval_transform(image_size))
    if train_set.classes != val_set.classes:
        print(f"config error: train and val class folders differ in {cfg.data}", file=sys.stderr)
        return 2
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, micro_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = len(loader) // accum_steps
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=len(train_set.classes))

    # --- Optimizer + DeepSpeed engine -----------------------------------------------------------
    peak_lr = cfg.base_lr * global_batch / 256
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    log.info("fine-tune %s (init %s): %d classes, %d train / %d val images, pool %s, drop path %.2f, "
             "layer decay %.2f; %d x %d x %d = %d images/step, %d steps, peak lr %.2e", cfg.encoder, cfg.init,
             len(train_set.classes), len(train_set), len(val_set), cfg.pool, cfg.drop_path, cfg.layer_decay,
             world_size, micro_batch, accum_steps, global_batch, total_steps, peak_lr)

    # --- Loop ---------------------------------------------------------------------------------
    metrics = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if rank == 0 else None

    def record(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            log.info("%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    step, micro_step, epoch = 0, 0, 0
    loss_sum = torch.zeros((), device=device)
    window_start = time.perf_counter()
    result = {}
    while step < total_steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, soft = mixup_fn(images, labels)  # soft: (B, classes)
            lr = cosine_schedule(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            logits = engine(images.to(dtype)).float()  # (B, classes)
            if mixup_fn is not None:
                loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            micro_step += 1
            if micro_step % accum_steps:
                continue
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                dist.all_reduce(loss_sum)  # the sync point: once per log interval
                n = (cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every) * accum_steps * world_size
                record({"step": step, "epoch": epoch, "loss": loss_sum.item() / n, "lr": lr,
                        "img_per_s": n * micro_batch / (time.perf_counter() - window_start)})
                loss_sum.zero_()
                window_start = time.perf_counter()
            if step == total_steps:
                break
        epoch += 1
        result = evaluate(engine.module, val_set, rank, world_size, device, dtype, micro_batch)
        record({"step": step, "epoch": epoch, **result})
    if metrics:
        metrics.close()

    # --- Save: fp32 master weights as a timm state dict (head included) ------------------------
    save_checkpoint(engine, cfg.output_dir, step, {"step": step, "config": dataclasses.asdict(cfg)})
    dist.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        state = consolidated_fp32_state_dict(cfg.output_dir, step_tag(step), {})
        save_file({k: v.float().contiguous() for k, v in state.items()},
                  os.path.join(cfg.output_dir, "classifier.safetensors"))
        with open(os.path.join(cfg.output_dir, "classifier.json"), "w") as f:
            json.dump({"timm_class": "timm.models.vision_transformer.VisionTransformer", "timm_kwargs": timm_kwargs,
                       "classes": train_set.classes, **result}, f, indent=2)
        log.info("done: %d steps, val top1 %.2f%%; classifier at %s", step, result.get("val_top1", math.nan),
                 os.path.join(cfg.output_dir, "classifier.safetensors"))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
