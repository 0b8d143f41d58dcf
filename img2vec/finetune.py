"""Fine-tune a pretrained encoder for classification (MAE's recipe), under DeepSpeed.

    deepspeed img2vec/finetune.py --ds_config configs/ds_zero2.json --encoder RUN_DIR --data_path ROOT [--key value ...]
    python img2vec/finetune.py --ds_config configs/ds_zero2.json --encoder RUN_DIR --data_path ROOT   # one process
    python img2vec/finetune.py --help                                 # every config key, grouped

The model is timm's VisionTransformer built from the encoder's timm kwargs (so what we
fine-tune is exactly what a user loads from the export), with a new linear head, drop path,
and average pooling of the patch tokens after the final norm. Recipe (MAE main_finetune.py):
AdamW (0.9, 0.999), layer-wise LR decay, lr = base_lr * batch / 256, warmup then half-cosine,
label smoothing 0.1; mixup / cutmix off by default (--mixup 0.8 --cutmix 1.0 turns them on).
`--init random` fine-tunes the same architecture from a seeded random init: the baseline.
The config keys are FinetuneConfig's (img2vec/config.py); set-up, non-finite guard and log
window are pretraining's (img2vec/runtime.py, img2vec/loop.py).

Writes output_dir/{config.yaml, metrics.jsonl (train loss, lr; val top1/top5 per epoch),
tensorboard/, checkpoints/ (DeepSpeed), classifier.safetensors + classifier.json (timm kwargs)}.
"""
import json
import logging
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from img2vec.checkpoint import consolidated_fp32_state_dict, save_checkpoint, step_tag
from img2vec.config import ConfigError, FinetuneConfig, build_parser, config_from_args, print_config
from img2vec.loop import LogWindow, NonFiniteGuard
from img2vec.metrics import MetricsLogger
from img2vec.optim import cosine_schedule
from img2vec.runtime import build_engine, launch_world_size, resolve_batch, setup_runtime
from img2vec.signals import GracefulStop

log = logging.getLogger("img2vec")


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(FinetuneConfig, __doc__.split("\n")[0])
    parser.add_argument("--ds_config", "--ds-config", required=True,
                        help="DeepSpeed JSON (engine: precision, ZeRO, clipping; batch unless batch_size/accum_iter)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(FinetuneConfig, args)
        resolved = resolve_batch(args.ds_config, cfg, launch_world_size())[1]  # the JSON checked before anything slow
        if args.print_config:
            print_config(resolved)
            return 0
        from img2vec.eval.common import eval_transform, image_folder

        val_probe = image_folder(os.path.join(cfg.data_path, "val"), None)
        train_probe = image_folder(os.path.join(cfg.data_path, "train"), None)
        if train_probe.classes != val_probe.classes:
            raise ConfigError(f"train and val class folders differ in {cfg.data_path}")
        rt, cfg = setup_runtime(args.ds_config, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rt.rank == 0:
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))

    # --- Model, data, optimizer, engine ----------------------------------------------------------
    model, timm_kwargs = build_classifier(cfg, len(val_probe.classes))
    image_size = timm_kwargs["img_size"]
    train_set = image_folder(os.path.join(cfg.data_path, "train"),
                             train_transform(image_size, cfg.crop_scale_min, cfg.hflip))
    val_set = image_folder(os.path.join(cfg.data_path, "val"), eval_transform(image_size))
    loader, sampler = train_loader(train_set, cfg, rt)
    steps_per_epoch = len(loader) // rt.accum_steps
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    mixup_fn = build_mixup(cfg, len(train_set.classes))
    peak_lr = cfg.base_lr * rt.global_batch / 256
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay), lr=peak_lr,
                                  betas=(0.9, 0.999), fused=True)  # fused: the guard's device-side skip
    guard = NonFiniteGuard(optimizer, rt.device, rt.world_size, max_in_a_row=5)
    engine, optimizer = build_engine(model, optimizer, rt)
    log.info("fine-tune %s (init %s): %d classes, %d train / %d val images, pool %s, drop path %.2f, "
             "layer decay %.2f; %s, %d steps, peak lr %.2e", cfg.encoder, cfg.init, len(train_set.classes),
             len(train_set), len(val_set), cfg.pool, cfg.drop_path, cfg.layer_decay, rt.log_line(), total_steps,
             peak_lr)

    # --- Loop: MAE's train_one_epoch, then an evaluation per epoch --------------------------------
    stop = GracefulStop()
    metrics = MetricsLogger(cfg.output_dir, total_steps, 0, enabled=rt.rank == 0, desc="finetune")
    window = LogWindow(rt.device, cfg.log_every, total_steps, rt.micro_batch, rt.accum_steps, rt.world_size)
    step, micro_step, epoch, result = 0, 0, 0, {}
    while step < total_steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(rt.device, non_blocking=True), labels.to(rt.device, non_blocking=True)
            if mixup_fn is not None:
                images, soft = mixup_fn(images, labels)  # soft: (B, classes)
            lr = cosine_schedule(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            logits = engine(images.to(rt.dtype)).float()  # (B, classes)
            if mixup_fn is not None:
                loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            engine.backward(loss)
            finite = guard.check(loss)
            if (micro_step + 1) % rt.accum_steps == 0:
                guard.arm()
            engine.step()
            window.add(loss, finite)
            micro_step += 1
            if micro_step % rt.accum_steps:
                continue
            step += 1
            guard.end_step()
            metrics.advance()
            if window.due(step):
                n_skipped, in_a_row = guard.read()
                row = window.close(step, n_skipped)
                metrics.log(step, {"epoch": epoch, "loss": row["loss"], "lr": lr, "img_per_s": row["img_per_s"],
                                   "skipped_steps": guard.total, **({"skipped": n_skipped} if n_skipped else {})})
                if guard.exhausted(in_a_row):
                    log.error("the loss was not finite for %d steps in a row (up to step %d): stopping; "
                              "lower base_lr", in_a_row, step)
                    metrics.close()
                    return 3
            if stop.requested or step == total_steps:
                break
        if stop.requested:  # no mid-run resume for fine-tuning: keep what was learned, say so
            log.warning("stopped by %s at step %d of %d; saving the classifier as it is", stop.signal_name,
                        step, total_steps)
            break
        epoch += 1
        result = evaluate(engine.module, val_set, rt.rank, rt.world_size, rt.device, rt.dtype, rt.micro_batch)
        metrics.log(step, {"epoch": epoch, **result})
        if rt.rank == 0:
            log.info("epoch %d: val top1 %.2f%%, top5 %.2f%%", epoch, result["val_top1"], result["val_top5"])
    metrics.close()
    save_classifier(engine, cfg, rt.rank, step, timm_kwargs, train_set.classes, result)
    return 0


def train_loader(train_set, cfg: FinetuneConfig, rt):
    """Each rank its DistributedSampler shard of a seeded per-epoch shuffle; (loader, sampler)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, rt.micro_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                        pin_memory=rt.device.type == "cuda", persistent_workers=False)
    return loader, sampler


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def save_classifier(engine, cfg: FinetuneConfig, rank: int, step: int, timm_kwargs: dict, classes: list,
                    result: dict) -> None:
    """fp32 master weights as a timm state dict (head included) + classifier.json (rank 0)."""
    save_checkpoint(engine, cfg.output_dir, step, {"step": step, "config": cfg.to_dict()})
    dist.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        state = consolidated_fp32_state_dict(cfg.output_dir, step_tag(step), {})
        save_file({k: v.float().contiguous() for k, v in state.items()},
                  os.path.join(cfg.output_dir, "classifier.safetensors"))
        with open(os.path.join(cfg.output_dir, "classifier.json"), "w") as f:
            json.dump({"timm_class": "timm.models.vision_transformer.VisionTransformer", "timm_kwargs": timm_kwargs,
                       "classes": classes, **result}, f, indent=2)
        log.info("done: %d steps, val top1 %.2f%%; classifier at %s", step, result.get("val_top1", math.nan),
                 os.path.join(cfg.output_dir, "classifier.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
