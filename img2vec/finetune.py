"""Fine-tune a pretrained encoder for classification (MAE's recipe), under DeepSpeed.

    deepspeed img2vec/finetune.py --ds_config configs/ds_finetune.json --config configs/finetune_vit_base.yaml \
        --encoder RUN_DIR --data_path ROOT [--key value ...]
    python img2vec/finetune.py --ds_config configs/ds_finetune.json --encoder RUN_DIR --data_path ROOT  # one process
    python img2vec/finetune.py --help                                 # every config key, grouped

The model is timm's VisionTransformer built from the encoder's timm kwargs (what a user loads
from the export) with a new head and drop path. Pooling is MAE's: `pool avg` averages the patch
tokens and then applies a new `fc_norm` (timm's default for global_pool="avg"); the pretrained
final norm is dropped, as MAE's main_finetune.py drops it. `pool cls` keeps the pretrained norm
and reads the class token. Augmentation is timm's own: create_transform (RandomResizedCrop, flip,
RandAugment, RandomErasing) and Mixup (mixup / cutmix / label smoothing) with
SoftTargetCrossEntropy; the presets configs/finetune_vit_*.yaml turn on MAE's values.
Optimization (MAE main_finetune.py): AdamW (0.9, 0.999), layer-wise LR decay, lr = base_lr *
batch / 256, warmup then half-cosine. `--init random` fine-tunes the same architecture from a
seeded random init: the baseline.

Runs like pretraining: one run per folder (img2vec/run_lock.py), checkpoints (img2vec/checkpoint.py),
resume from the newest complete one, SIGTERM/SIGINT checkpoint and exit 0, the non-finite guard
and log window of img2vec/loop.py. Unreadable images are skipped as pretraining skips them (each
named once in the log, counted at the end): in train the next usable file takes the place of one,
in val it is left out (img2vec.eval.common.ReadableImages).
Resuming is bitwise: each image's augmentation is seeded by (seed, epoch, index), and the
batch order by (seed, epoch). With no output_dir the run goes to <encoder's run>/finetune
(`_<tag>` for a checkpoint folder, `_random` for --init random), never to a shared folder.

Writes output_dir/{config.yaml + config.<step>.yaml per launch, metrics.jsonl (train loss, lr;
val top1/top5 per epoch; resumed events), ds_config.json,
tensorboard/, checkpoints/ (DeepSpeed), classifier.safetensors + classifier.json (timm kwargs)}.
"""
import gc
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, replace

if __name__ == "__main__":  # start-up without the cycle collector (runtime.end_start_up)
    gc.disable()
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from img2vec.checkpoint import (ARCHITECTURE_KEYS, consolidated_fp32_state_dict,
                                resume_checkpoint, save_checkpoint, step_tag)
from img2vec.config import ConfigError, FinetuneConfig
from img2vec.distributed import agree_any
from img2vec.loop import LogWindow, NonFiniteGuard, backward_and_step, log_window, report_skipped_files
from img2vec.metrics import MetricsLogger, append_event, keep_metrics_until
from img2vec.optim import cosine_schedule
from img2vec.run_lock import lock_run_dir
from img2vec.runtime import (Runtime, build_engine, end_start_up, entry_config, exit_process, report_user_error,
                             setup_runtime)
from img2vec.signals import GracefulStop

log = logging.getLogger("img2vec")


def main(argv: list[str] | None = None) -> int:
    try:
        entry = entry_config(FinetuneConfig, __doc__.split("\n")[0], argv, finish=with_output_dir)
        if entry is None:  # --print_config
            return 0
        classes = class_names(entry[1].data_path)
        rt, cfg = setup_runtime(*entry)
        if (cfg.mixup > 0 or cfg.cutmix > 0) and rt.micro_batch % 2:
            raise ConfigError(f"mixup/cutmix pair each image with another: use an even batch_size, "
                              f"got {rt.micro_batch}")
        lock_run_dir(cfg.output_dir)  # one run per folder, held until exit; before anything slow
        run = build_finetuning(cfg, rt, classes)
        state = resume(cfg, rt, run)
        end_start_up()  # imports and engine done: the cycle collector back on
        step, result, exit_code = finetune(cfg, rt, run, state)
        if exit_code is not None:  # stopped by a signal (0) or by non-finite losses (3)
            return exit_code
        report_skipped_files(run.skips.items(), rt.rank, cfg.data_path)  # train and val
        save_classifier(cfg, rt.rank, step, run, result)
    except Exception as e:
        return report_user_error(e)  # a mistake the user can fix: one line, exit 2; a bug re-raises
    return 0


# --- Set-up ---------------------------------------------------------------------------------


def with_output_dir(cfg: FinetuneConfig) -> FinetuneConfig:
    """cfg with output_dir set: as given, else beside the encoder's run, one folder per starting
    point (a random-init baseline never lands in the pretrained fine-tune's folder)."""
    if cfg.output_dir:
        return cfg
    path = os.path.abspath(cfg.encoder)
    run, tag = path, ""
    if os.path.isfile(path):  # run_dir/encoder.safetensors
        run = os.path.dirname(path)
    elif os.path.basename(os.path.dirname(path)) == "checkpoints":  # run_dir/checkpoints/<tag>
        run, tag = os.path.dirname(os.path.dirname(path)), os.path.basename(path)
    name = "finetune" + (f"_{tag}" if tag else "") + ("_random" if cfg.init == "random" else "")
    return replace(cfg, output_dir=os.path.join(run, name))


def class_names(data_path: str) -> list[str]:
    from img2vec.eval.common import labeled_split

    train, val = (labeled_split(os.path.join(data_path, s), None).classes for s in ("train", "val"))
    if train != val:
        raise ConfigError(f"train and val class folders differ in {data_path}")
    return train


def resume(cfg: FinetuneConfig, rt: Runtime, run: "Finetuning") -> dict:
    """Weights, optimizer, RNG states and position come back from the newest complete checkpoint;
    batches and augmentations are functions of (seed, epoch, index), so the continued run sees what
    an uninterrupted one would. Only then is anything written: a refused checkpoint leaves the
    folder as it was. Returns the checkpoint's state ({} for a fresh start)."""
    state = resume_checkpoint(run.engine, cfg.output_dir, run.ckpt_config, cfg.trust_checkpoint) if cfg.resume else None
    step = state["step"] if state else 0
    if rt.rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        keep_metrics_until(os.path.join(cfg.output_dir, "metrics.jsonl"), step)  # rows past the checkpoint go
        if state:  # loss.png marks where a run resumed
            append_event(os.path.join(cfg.output_dir, "metrics.jsonl"), step, "resumed", total_steps=run.total_steps)
        for name in ("config.yaml", f"config.{step:06d}.yaml"):  # the latest, and one per launch
            cfg.save(os.path.join(cfg.output_dir, name))
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(rt.ds_config, f, indent=2)
    return state or {}


@dataclass
class Finetuning:
    """Everything the step loop uses, built from the config."""
    engine: object  # the DeepSpeed engine around the classifier
    optimizer: torch.optim.Optimizer  # as DeepSpeed wrapped it (param_groups carry lr_scale)
    guard: NonFiniteGuard
    loader: object  # DataLoader over SeededSamples; batches: images (B, 3, H, W), labels (B,), files skipped
    sampler: "ResumableSampler"
    val_set: object  # ReadableImages of the val split (unreadable files left out)
    skips: object  # dataloading's SkipLog: the unreadable files met so far, each logged once
    mixup: object  # timm Mixup or None
    criterion: nn.Module
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    timm_kwargs: dict
    classes: list
    ckpt_config: dict  # what checkpoints record and resume checks: the config + the architecture


def build_finetuning(cfg: FinetuneConfig, rt: Runtime, classes: list[str]) -> Finetuning:
    """Model, data, optimizer and engine."""
    from torch.utils.data import DataLoader

    from dataloading.datasets import SkipLog
    from img2vec.eval.common import collate_readable, eval_transform, labeled_split, load_encoder_state

    state, timm_kwargs = load_encoder_state(cfg.encoder, cfg.trust_checkpoint)
    model, kwargs = build_classifier(state, timm_kwargs, len(classes), cfg.pool, cfg.drop_path, cfg.init, cfg.seed)
    image_size = kwargs["img_size"]
    train_set = SeededSamples(labeled_split(os.path.join(cfg.data_path, "train"), train_transform(cfg, image_size),
                                            substitute=True), cfg.seed)
    val_set = labeled_split(os.path.join(cfg.data_path, "val"), eval_transform(image_size))
    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, rt.micro_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
                        collate_fn=collate_readable, pin_memory=rt.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(loader) // rt.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} train images make no optimizer step of {rt.global_batch} images: "
                          f"lower batch_size or accum_iter")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    peak_lr = cfg.base_lr * rt.global_batch / 256  # MAE's linear scaling rule
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay), lr=peak_lr,
                                  betas=(0.9, 0.999), fused=True)  # fused: the guard's device-side skip
    guard = NonFiniteGuard(optimizer, rt.device, rt.world_size, cfg.max_nonfinite_steps)
    arch = {k: None for k in ARCHITECTURE_KEYS}  # pretraining's keys, absent here
    arch.update(model=f"vit d{kwargs['embed_dim']} L{kwargs['depth']} p{kwargs['patch_size']} "
                      f"classes {len(classes)} pool {cfg.pool}", image_size=image_size)
    engine, optimizer = build_engine(model.to(rt.device), optimizer, rt)
    mixup, criterion = build_mixup(cfg, len(classes))
    log.info("fine-tune %s (init %s): %d classes, %d train / %d val images, pool %s, drop path %.2f, layer decay "
             "%.2f, augment %s, mixup %s; %s, %d steps, peak lr %.2e", cfg.encoder, cfg.init, len(classes),
             len(train_set), len(val_set), cfg.pool, cfg.drop_path, cfg.layer_decay, cfg.auto_augment or "off",
             "on" if mixup else "off", rt.log_line(), total_steps, peak_lr)
    return Finetuning(engine, optimizer, guard, loader, sampler, val_set, SkipLog(), mixup, criterion, steps_per_epoch,
                      total_steps, int(cfg.warmup_epochs * steps_per_epoch), peak_lr, kwargs, classes,
                      {**cfg.to_dict(), **arch})


# --- Model: timm VisionTransformer + layer-wise LR decay ------------------------------------


def build_classifier(state: dict, timm_kwargs: dict, num_classes: int, pool: str, drop_path: float,
                     init: str = "pretrained", seed: int = 0) -> tuple[nn.Module, dict]:
    """timm VisionTransformer with the encoder's weights (or its seeded random init) and a new head.

    pool "avg" (MAE): mean of the patch tokens, then a new fc_norm; the pretrained final norm is
    not loaded (timm's `norm` is the identity there), as MAE's main_finetune.py leaves it out.
    pool "cls": the class token after the pretrained final norm.
    """
    from timm.models.vision_transformer import VisionTransformer

    from img2vec.eval.common import build_encoder

    if init == "random":  # our init (xavier, sin-cos pos_embed), as the kNN baseline uses
        torch.manual_seed(seed)
        state = build_encoder(timm_kwargs).state_dict()
    kwargs = {**timm_kwargs, "num_classes": num_classes, "drop_path_rate": drop_path,
              "global_pool": "avg" if pool == "avg" else "token", "fc_norm": None}  # None: timm's default
    torch.manual_seed(seed)
    model = VisionTransformer(**kwargs)
    if pool == "avg":
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = {"head.bias", "head.weight"} | ({"fc_norm.bias", "fc_norm.weight"} if pool == "avg" else set())
    assert not unexpected and set(missing) == fresh, (missing, unexpected)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head
    nn.init.zeros_(model.head.bias)
    return model, kwargs


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, num_layers for the final norms and head (MAE lrd)."""
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


# --- Data: timm's transforms and mixup, seeded per image -------------------------------------


def train_transform(cfg: FinetuneConfig, image_size: int):
    """timm.data.create_transform as MAE's util/datasets.py calls it: RandomResizedCrop (bicubic),
    flip, RandAugment when auto_augment is set, normalize, RandomErasing when re_prob > 0. No
    colour jitter (MAE passes None; timm would add 0.4 without RandAugment)."""
    from timm.data import create_transform

    from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

    transform = create_transform(image_size, is_training=True, scale=(cfg.crop_scale_min, 1.0), hflip=cfg.hflip,
                                 color_jitter=None, auto_augment=cfg.auto_augment or None, interpolation="bicubic",
                                 re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment's operations
            if op.aug_fn.__name__ == "posterize":
                op.aug_fn = posterize_any_bits
    return transform


def posterize_any_bits(img, bits_to_keep: int, **kwargs):
    """timm's posterize, where keeping 0 bits gives a black image, as older Pillow and TF's
    RandAugment do. timm's PosterizeIncreasing asks for 0 bits whenever the sampled magnitude
    reaches 10 (m9, mstd 0.5: about 2% of its draws), and Pillow >= 12 refuses 0: the run would
    crash on about one image in a few hundred."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit cleared
    return posterize(img, bits_to_keep, **kwargs)


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    """(timm Mixup or None, the loss): with mixup or cutmix, Mixup with MAE's arguments (switch
    prob 0.5, per batch; it smooths the labels) and SoftTargetCrossEntropy; else cross-entropy
    with label smoothing (timm's LabelSmoothingCrossEntropy, as MAE)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()


class SeededSamples(Dataset):
    """dataset[(epoch, index)] = base[index] with the augmentation's python, NumPy and torch (CPU)
    RNGs seeded by (seed, epoch, index): an image's augmentation depends on nothing else (not the
    worker, not where a run resumed). In the trainer's own process (num_workers 0) the caller's RNG
    states are put back afterwards; a worker's RNGs serve only this dataset."""

    def __init__(self, base, seed: int):
        self.base, self.seed, self.classes = base, seed, base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        from torch.utils.data import get_worker_info

        epoch, index = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        if get_worker_info() is not None:
            _seed_cpu_rngs(seed)
            return self.base[index]
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        _seed_cpu_rngs(seed)
        try:
            return self.base[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def _seed_cpu_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the trainer's


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a seeded shuffle per epoch) that yields (epoch, index) for SeededSamples
    and can start an epoch part-way: set_epoch(epoch, start) skips this rank's first `start` indices."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


# --- The step loop ----------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig, rt: Runtime, run: Finetuning, state: dict) -> tuple[int, dict, int | None]:
    """Optimizer steps from the resumed step to run.total_steps, an evaluation after each epoch.
    Returns (step, last evaluation, None) when done, or (step, evaluation, exit code) when a
    signal (0) or a streak of non-finite losses (3) stopped the run."""
    step, result = state.get("step", 0), state.get("result", {})
    run.guard.total = state.get("skipped_steps", 0)
    stop = GracefulStop()
    metrics = MetricsLogger(cfg.output_dir, run.total_steps, step, enabled=rt.rank == 0, desc="finetune")
    window = LogWindow(rt.device, cfg.log_every, run.total_steps, rt.micro_batch, rt.accum_steps, rt.world_size)
    while step < run.total_steps:
        epoch, offset = divmod(step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch, offset * rt.accum_steps * rt.micro_batch)
        micro_step = 0
        for images, labels, skipped in run.loader:  # (B, 3, H, W), (B,); a skipped file's place taken by the next
            run.skips.add(skipped)
            images, labels = images.to(rt.device, non_blocking=True), labels.to(rt.device, non_blocking=True)
            target = labels
            if run.mixup is not None:
                images, target = run.mixup(images, labels)  # target: (B, classes), smoothed and mixed
            lr = cosine_schedule(step, run.total_steps, run.warmup_steps, run.peak_lr, cfg.min_lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            logits = run.engine(images.to(rt.dtype)).float()  # (B, classes)
            loss = run.criterion(logits, target)
            backward_and_step(run.engine, run.guard, window, loss, (micro_step + 1) % rt.accum_steps == 0)
            micro_step += 1
            if micro_step % rt.accum_steps:
                continue
            step += 1
            run.guard.end_step()
            metrics.advance()
            if window.due(step) and not log_window(step, window, run.guard, metrics, {"lr": lr, "epoch": epoch},
                                                   cfg.output_dir):
                metrics.close()
                return step, result, 3
            epoch_done = step % run.steps_per_epoch == 0 or step == run.total_steps
            if epoch_done:  # before the checkpoint: a run resumed from it never misses this evaluation
                result = evaluate(run.engine.module, run.val_set, rt, cfg.seed, run.skips)
                metrics.log(step, {"epoch": epoch + 1, **result})
                log.info("epoch %d: val top1 %.2f%%, top5 %.2f%%", epoch + 1, result["top1"], result["top5"])
            stopping = stop.requested
            if rt.world_size > 1:  # all ranks must stop at the same step: agree where they sync anyway
                stopping = (step % cfg.log_every == 0 or epoch_done) and agree_any(stopping, rt.device)
            if (step % cfg.ckpt_every == 0 if cfg.ckpt_every else epoch_done) or step == run.total_steps or stopping:
                save_checkpoint(run.engine, cfg.output_dir, step, {"config": run.ckpt_config, "result": result,
                                                                    "skipped_steps": run.guard.total}, cfg.keep_last)
            if stopping:
                metrics.close()
                log.warning("stopped by %s at step %d; checkpoint written. Rerun the same command to resume",
                            stop.signal_name or "a signal on another rank", step)
                return step, result, 0
            if epoch_done:
                break
    metrics.close()
    return step, result, None


@torch.no_grad()
def evaluate(model: nn.Module, val_set, rt: Runtime, seed: int, skips) -> dict[str, float]:
    """Top-1/top-5 over the whole val split: rank r scores images r, r + W, ...; counts all-reduced.
    Unreadable files are left out (and go to `skips`, a SkipLog). Every rank runs the same number of
    forwards, a dummy one where its shard has no batch left or a batch has no readable image: under
    ZeRO-3 each forward gathers the parameters from all ranks. The loader draws from its own
    generator: an evaluation leaves the training RNGs untouched."""
    from torch.utils.data import DataLoader, Subset

    from img2vec.eval.common import collate_readable

    model.eval()
    counts = torch.zeros(3, device=rt.device, dtype=torch.float64)  # top1 hits, top5 hits, images
    shard = Subset(val_set, list(range(rt.rank, len(val_set), rt.world_size)))
    loader = iter(DataLoader(shard, rt.micro_batch, num_workers=0, collate_fn=collate_readable,
                             generator=torch.Generator().manual_seed(seed)))
    forwards = math.ceil(math.ceil(len(val_set) / rt.world_size) / rt.micro_batch)  # the largest shard's
    for _ in range(forwards):
        images, labels, skipped = next(loader, (None, None, []))  # (B, 3, H, W), (B,); None: nothing to score
        skips.add(skipped)
        if images is None:
            model(torch.zeros(1, 3, *model.patch_embed.img_size, device=rt.device, dtype=rt.dtype))
            continue
        logits = model(images.to(rt.device, rt.dtype)).float()  # (B, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()  # (B, 5)
        hits = top5 == labels.unsqueeze(1)
        counts += torch.tensor([hits[:, 0].sum(), hits.any(1).sum(), len(labels)], dtype=torch.float64,
                               device=rt.device)
    dist.all_reduce(counts)  # the sync point of an evaluation
    model.train()
    return {"top1": 100.0 * (counts[0] / counts[2]).item(), "top5": 100.0 * (counts[1] / counts[2]).item()}


# --- The end of a run -------------------------------------------------------------------------


def save_classifier(cfg: FinetuneConfig, rank: int, step: int, run: Finetuning, result: dict) -> None:
    """fp32 master weights of the last checkpoint as a timm state dict (head included) and
    classifier.json (rank 0)."""
    dist.barrier()
    if rank == 0:
        from safetensors.torch import save_file

        state = consolidated_fp32_state_dict(cfg.output_dir, step_tag(step), {}, cfg.trust_checkpoint)
        save_file({k: v.float().contiguous() for k, v in state.items()},
                  os.path.join(cfg.output_dir, "classifier.safetensors"))
        with open(os.path.join(cfg.output_dir, "classifier.json"), "w") as f:
            json.dump({"timm_class": "timm.models.vision_transformer.VisionTransformer",
                       "timm_kwargs": run.timm_kwargs, "classes": run.classes, **result}, f, indent=2)
        log.info("done: %d steps, val top1 %.2f%%; classifier at %s", step, result.get("top1", math.nan),
                 os.path.join(cfg.output_dir, "classifier.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    exit_process(main())
