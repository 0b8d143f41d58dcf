"""Pretrain an Img2Vec ViT: a student regresses a frozen teacher's features on masked patches.

    deepspeed img2vec/train.py --ds_config configs/ds_zero2.json [--config run.yaml] [--key value ...]
    python img2vec/train.py --ds_config configs/ds_zero2.json      # one process, no launcher

With no run config the embedded default runs: a tiny ViT on the bundled sample photographs
against a randomly initialised ResNet-50 teacher, a few minutes on a laptop CPU.
Reads top to bottom: config, engine, data, teacher, student, loop, export.
"""
import argparse
import json
import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed
import torch
import torch.distributed as dist

from dataloading import LoaderSpec, build_loader
from img2vec.checkpoint import (CheckpointError, consolidated_fp32_state_dict, export_encoder,
                                frozen_parameters, resume_checkpoint, save_checkpoint, step_tag)
from img2vec.config import ConfigError, load_config
from img2vec.token_diversity import collapse_probe
from img2vec.distributed import agree_any, init_distributed, seed_everything
from img2vec.ds_config import ds_precision, load_ds_config
from img2vec.optim import build_optimizer, cosine_schedule, set_lr_wd, skip_step_if
from img2vec.signals import GracefulStop
from img2vec.fastpaths import resolve_attn, resolve_loss
from img2vec.masking import mask_noise, random_masking
from img2vec.metrics import MetricsLogger, plot_loss_curve
from img2vec.teacher import Teacher
from img2vec.vit import build_student, count_params

log = logging.getLogger("img2vec")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (engine: batch, precision, ZeRO)")
    parser.add_argument("--config", default=None, help="optional YAML run config (see configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    # --- Engine: process group, DeepSpeed config, device, seeds -------------------------
    rank, world_size, local_rank = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ds_config = load_ds_config(args.ds_config, world_size)
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    accum_steps = ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]  # images per optimizer step, all ranks
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = ds_precision(ds_config)
    seed_everything(cfg.seed)

    # --- Data: each rank reads its slice of a world-size-independent global batch ------
    loader = build_loader(LoaderSpec(data_path=cfg.data_path, image_size=cfg.image_size,
                                     micro_batch=micro_batch, rank=rank, world_size=world_size,
                                     seed=cfg.seed, num_workers=cfg.num_workers,
                                     backend=cfg.data_backend, pin_memory=device.type == "cuda"))
    micro_steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.max_steps or max(1, cfg.epochs * micro_steps_per_epoch // accum_steps)
    warmup_steps = int(cfg.warmup_epochs * micro_steps_per_epoch / accum_steps)

    # --- Teacher: frozen, outside the engine (ZeRO must not shard or step it) ------------
    teacher_weights = cfg.teacher_weights or "random"  # "" only passes validation on sample data
    teacher = Teacher(cfg.teacher, cfg.teacher_stage, teacher_weights, cfg.resolved_patch_size,
                      cfg.image_size, seed=cfg.seed).to(device)

    # --- Student + optimizer + DeepSpeed engine -----------------------------------------
    attn_impl = resolve_attn(cfg.attn_impl, device)
    loss_name, loss_fn = resolve_loss(cfg.loss_impl, device)
    student = build_student(cfg.model, cfg.image_size, cfg.resolved_patch_size, teacher.channels,
                            cfg.decoder_depth, cfg.decoder_width, cfg.decoder_heads, attn_impl,
                            cfg.grad_ckpt).to(device)
    peak_lr = cfg.base_lr * global_batch / 256  # MAE's linear scaling rule
    final_wd = cfg.weight_decay if cfg.weight_decay_end < 0 else cfg.weight_decay_end
    optimizer = build_optimizer(student, peak_lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                cfg.fused_optim)
    num_patches, student_params, encoder_params = (student.encoder.num_patches, count_params(student),
                                                   count_params(student.encoder))  # before ZeRO-3 shards them
    frozen = frozen_parameters(student)
    base_optimizer = optimizer  # DeepSpeed wraps it; the device-side step skip talks to this one
    engine, optimizer, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    knn = None
    if cfg.eval_every:  # periodic kNN top-1 on a small labeled split: "is it learning?"
        from img2vec.eval.knn import KnnMonitor

        knn = KnnMonitor(os.path.join(cfg.eval_data, "train"), os.path.join(cfg.eval_data, "val"), cfg.image_size)
    if cfg.compile:  # after initialize: DeepSpeed's hooks stay outside the compiled graphs
        engine.compile()
        teacher = torch.compile(teacher)
    log.info("student %s: %.1fM params (encoder %.1fM), %d patches, mask %.2f; teacher %s stage %d "
             "(C=%d, weights=%s); attention %s, loss %s, %s on %s; world %d x micro %d x accum %d = %d "
             "images/step, %d steps, peak lr %.2e", cfg.model, student_params / 1e6,
             encoder_params / 1e6, num_patches, cfg.mask_ratio, cfg.teacher,
             cfg.teacher_stage, teacher.channels, teacher_weights, attn_impl, loss_name,
             str(dtype).replace("torch.", ""), device, world_size, micro_batch, accum_steps,
             global_batch, total_steps, peak_lr)

    # --- Resume: weights, optimizer and position come back; data and masks are functions
    # of (seed, step), so the continued run sees exactly what an uninterrupted one would.
    # Only then is anything written: a refused checkpoint leaves the run directory as it was.
    step, skipped_steps = 0, 0
    if cfg.resume:
        try:
            state = resume_checkpoint(engine, cfg.output_dir, cfg.to_dict(), cfg.trust_checkpoint)
        except CheckpointError as e:
            log.error("%s", e)
            return 2
        if state is not None:
            step, skipped_steps = state["step"], state.get("skipped_steps", 0)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rank == 0:
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)

    def checkpoint():  # collective; the weights are the last good ones (skipped steps change nothing)
        save_checkpoint(engine, cfg.output_dir, step, {"config": cfg.to_dict(), "skipped_steps": skipped_steps},
                        cfg.keep_last)

    # --- Loop ------------------------------------------------------------------------------
    stop = GracefulStop()
    metrics = MetricsLogger(cfg.output_dir, total_steps, step, enabled=rank == 0)
    micro_step = step * accum_steps  # index into the endless stream of micro-batches
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no per-step host sync
    nonfinite = torch.zeros((), device=device)  # non-finite losses in this accumulation window
    skipped = torch.zeros((), device=device)  # skipped steps in this log window
    consecutive = torch.zeros((), device=device)  # skipped steps in a row
    diversity = {}  # device scalars from the last collapse probe, read at the next log
    window_start, window_images = time.perf_counter(), 0
    while step < total_steps:
        epoch, offset = divmod(micro_step, micro_steps_per_epoch)
        for batch in loader.iter_from(epoch, offset):
            images = batch["images"].to(device, non_blocking=True)  # (B, 3, H, W) fp32
            target = teacher(images)  # (B, N, C) fp32, no grad
            noise = mask_noise(micro_batch * world_size, num_patches, cfg.seed, micro_step)
            mask = random_masking(micro_batch, num_patches, cfg.mask_ratio, device=device,
                                  noise=noise[rank * micro_batch:(rank + 1) * micro_batch])
            lr = cosine_schedule(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            set_lr_wd(optimizer, lr, cosine_schedule(step, total_steps, 0, cfg.weight_decay, final_wd))

            pred = engine(images.to(dtype), mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
            loss = loss_fn(pred, target, mask.ids_masked, cfg.loss_beta, cfg.loss_eps)
            if cfg.diversity_every and micro_step % (cfg.diversity_every * accum_steps) == 0:
                diversity = collapse_probe(pred, target, mask.ids_masked)  # step 0: the teacher's, at start
            engine.backward(loss)
            finite = torch.isfinite(loss.detach())
            nonfinite += ~finite
            if (micro_step + 1) % accum_steps == 0:  # the optimizer steps in engine.step() below
                if world_size > 1:
                    dist.all_reduce(nonfinite)  # every rank skips the same steps (async on GPU)
                skip_step_if(base_optimizer, nonfinite)
            engine.step()  # updates only at the accumulation boundary
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            micro_step += 1
            window_images += micro_batch * world_size
            if micro_step % accum_steps:
                continue
            step += 1
            was_skipped = (nonfinite > 0).float()
            skipped += was_skipped
            consecutive = (consecutive + 1) * was_skipped
            nonfinite.zero_()
            metrics.advance()

            if step % cfg.log_every == 0 or step == total_steps:
                dist.all_reduce(loss_sum)  # the sync point: once per log interval
                window_steps = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                n_skipped, in_a_row = int(skipped.item()), int(consecutive.item())
                skipped_steps += n_skipped
                kept = max(1, (window_steps - n_skipped) * accum_steps * world_size)
                metrics.log(step, {"loss": loss_sum.item() / kept, "lr": lr, "epoch": epoch,
                                   "img_per_s": window_images / (time.perf_counter() - window_start),
                                   "skipped_steps": skipped_steps,
                                   **{name: value.item() for name, value in diversity.items()}})
                if n_skipped:
                    log.warning("step %d: %d step(s) skipped for a non-finite loss (%d in all)", step,
                                n_skipped, skipped_steps)
                if in_a_row >= cfg.max_nonfinite_steps:
                    log.error("the loss was not finite for %d steps in a row (up to step %d): stopping. The last "
                              "good checkpoint is in %s; lower base_lr or check the data, then rerun to resume",
                              in_a_row, step, os.path.join(cfg.output_dir, "checkpoints"))
                    metrics.close()
                    return 3
                loss_sum.zero_()
                skipped.zero_()
                window_start, window_images = time.perf_counter(), 0
            if knn is not None and (step % cfg.eval_every == 0 or step == total_steps):
                metrics.log(step, knn(engine.module.encoder, device, dtype))  # every rank: ZeRO-3 gathers
            stopping = stop.requested
            if world_size > 1:  # all ranks must stop at the same step: agree where they sync anyway
                stopping = step % cfg.log_every == 0 and agree_any(stopping, device)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps or stopping:
                checkpoint()
            if stopping:
                metrics.close()
                log.warning("stopped by %s at step %d; checkpoint written. Rerun the same command to resume",
                            stop.signal_name or "a signal on another rank", step)
                return 0
            if step == total_steps:
                break
    metrics.close()
    skipped_files = loader.skipped_files()  # (file, reason) of each unreadable image this rank skipped
    if skipped_files:
        log.warning("rank %d skipped %d unreadable file(s), e.g. %s (%s); python -m dataloading.verify %s "
                    "lists them", rank, len(skipped_files), *skipped_files[0], cfg.data_path or "<data_path>")

    # --- Export: fp32 master weights of the encoder, timm names; the loss curve ----------
    dist.barrier()
    if rank == 0:
        state = consolidated_fp32_state_dict(cfg.output_dir, step_tag(step), frozen)
        path = export_encoder(state, student.encoder.timm_kwargs(), cfg.output_dir)
        plot_loss_curve(metrics.jsonl_path, os.path.join(cfg.output_dir, "loss.png"))
        log.info("done: %d steps; encoder at %s; resume or extend with --max_steps N", step, path)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
