"""Pretrain an Img2Vec ViT: a student regresses a frozen teacher's features on masked patches.

    deepspeed img2vec/train.py --ds_config configs/ds_zero2.json [--config run.yaml] [--key value ...]
    python img2vec/train.py --ds_config configs/ds_zero2.json      # one process, no launcher
    python img2vec/train.py --help                                 # every config key, grouped

With no run config the embedded default runs: a tiny ViT on the bundled sample photographs
against a randomly initialised ResNet-50 teacher, a few minutes on a laptop CPU.
Reads top to bottom: main (config, set-up, resume, pretrain, export), then the step loop.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from dataloading import DataError
from img2vec.checkpoint import (CheckpointError, consolidated_fp32_state_dict, export_encoder,
                                frozen_parameters, resume_checkpoint, save_checkpoint, step_tag)
from img2vec.config import Config, ConfigError, build_parser, config_from_args, print_config
from img2vec.distributed import agree_any
from img2vec.loop import LogWindow, NonFiniteGuard
from img2vec.masking import mask_noise, random_masking
from img2vec.metrics import MetricsLogger, plot_loss_curve
from img2vec.optim import cosine_schedule, set_lr_wd
from img2vec.runtime import Runtime, launch_world_size, resolve_batch, setup_runtime
from img2vec.signals import GracefulStop
from img2vec.token_diversity import collapse_probe

log = logging.getLogger("img2vec")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(Config, __doc__.split("\n")[0])
    parser.add_argument("--ds_config", "--ds-config", required=True,
                        help="DeepSpeed JSON (engine: precision, ZeRO, clipping; batch unless batch_size/accum_iter)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(Config, args)
        resolved = resolve_batch(args.ds_config, cfg, launch_world_size())[1]  # the JSON checked before anything slow
        if args.print_config:
            print_config(resolved)
            return 0
        rt, cfg = setup_runtime(args.ds_config, cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run = build_pretraining(cfg, rt)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2

    # Resume: weights, optimizer and position come back; data and masks are functions of
    # (seed, step), so the continued run sees exactly what an uninterrupted one would.
    # Only then is anything written: a refused checkpoint leaves the run directory as it was.
    step, skipped_steps = 0, 0
    if cfg.resume:
        try:
            state = resume_checkpoint(run.engine, cfg.output_dir, cfg.to_dict(), cfg.trust_checkpoint)
        except CheckpointError as e:
            log.error("%s", e)
            return 2
        if state is not None:
            step, skipped_steps = state["step"], state.get("skipped_steps", 0)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if rt.rank == 0:
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(rt.ds_config, f, indent=2)

    try:
        step, exit_code = pretrain(cfg, rt, run, step, skipped_steps)
    except DataError as e:  # e.g. every image failed to decode mid-run
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if exit_code is not None:  # stopped by a signal (0) or by non-finite losses (3)
        return exit_code
    report_skipped_files(run.loader, rt.rank, cfg.data_path)
    export(cfg, rt, run, step)
    return 0


# --- Set-up ---------------------------------------------------------------------------------


@dataclass
class Pretraining:
    """Everything the step loop uses, built from the config."""
    loader: object  # dataloading's loader: iter_from(epoch, offset) -> {"images": (B, 3, H, W)}
    teacher: torch.nn.Module
    engine: object  # the DeepSpeed engine around the student
    optimizer: torch.optim.Optimizer  # as DeepSpeed wrapped it (param_groups: lr, weight decay)
    guard: NonFiniteGuard
    loss_fn: object  # masked_feature_loss(pred, target, ids_masked, beta, eps) -> scalar
    knn: object  # KnnMonitor or None
    num_patches: int  # N
    total_steps: int
    warmup_steps: int
    peak_lr: float
    frozen: dict  # frozen parameters (the fixed pos_embed), for the export
    timm_kwargs: dict


def build_pretraining(cfg: Config, rt: Runtime) -> Pretraining:
    """Data, teacher, student, optimizer and engine, in this order (the seeded init depends on it)."""
    from dataloading import LoaderSpec, build_loader
    from img2vec.fastpaths import resolve_attn, resolve_loss
    from img2vec.optim import build_optimizer
    from img2vec.runtime import build_engine, build_student_from_config, build_teacher
    from img2vec.vit import count_params

    # Data: each rank reads its slice of a world-size-independent global batch.
    loader = build_loader(LoaderSpec(data_path=cfg.data_path, image_size=cfg.image_size,
                                     micro_batch=rt.micro_batch, rank=rt.rank, world_size=rt.world_size,
                                     seed=cfg.seed, num_workers=cfg.num_workers, backend=cfg.data_backend,
                                     pin_memory=rt.device.type == "cuda", max_image_pixels=cfg.max_image_pixels))
    micro_steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.max_steps or max(1, cfg.epochs * micro_steps_per_epoch // rt.accum_steps)
    warmup_steps = int(cfg.warmup_epochs * micro_steps_per_epoch / rt.accum_steps)
    teacher = build_teacher(cfg).to(rt.device)  # frozen, outside the engine (ZeRO must not shard or step it)
    attn_impl = resolve_attn(cfg.attn_impl, rt.device)
    loss_name, loss_fn = resolve_loss(cfg.loss_impl, rt.device)
    student = build_student_from_config(cfg, teacher.channels, attn_impl).to(rt.device)
    peak_lr = cfg.base_lr * rt.global_batch / 256  # MAE's linear scaling rule
    optimizer = build_optimizer(student, peak_lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                cfg.fused_optim)
    guard = NonFiniteGuard(optimizer, rt.device, rt.world_size, cfg.max_nonfinite_steps)
    sizes = (count_params(student), count_params(student.encoder))  # before ZeRO-3 shards them
    num_patches, frozen, timm_kwargs = student.encoder.num_patches, frozen_parameters(student), \
        student.encoder.timm_kwargs()
    engine, optimizer = build_engine(student, optimizer, rt)
    knn = None
    if cfg.eval_every:  # periodic kNN top-1 on a small labeled split: "is it learning?"
        from img2vec.eval.knn import KnnMonitor

        knn = KnnMonitor(os.path.join(cfg.eval_data, "train"), os.path.join(cfg.eval_data, "val"), cfg.image_size)
    if cfg.compile:  # after initialize: DeepSpeed's hooks stay outside the compiled graphs
        engine.compile()
        teacher = torch.compile(teacher)
    log.info("student %s: %.1fM params (encoder %.1fM), %d patches, mask %.2f; teacher %s stage %d "
             "(C=%d, weights=%s); attention %s, loss %s, %s on %s; %s, %d steps, peak lr %.2e", cfg.model,
             sizes[0] / 1e6, sizes[1] / 1e6, num_patches, cfg.mask_ratio, cfg.teacher, cfg.teacher_stage,
             teacher.channels, cfg.teacher_weights or "random", attn_impl, loss_name,
             str(rt.dtype).replace("torch.", ""), rt.device, rt.log_line(), total_steps, peak_lr)
    return Pretraining(loader, teacher, engine, optimizer, guard, loss_fn, knn, num_patches, total_steps,
                       warmup_steps, peak_lr, frozen, timm_kwargs)


# --- The step loop ----------------------------------------------------------------------------


def pretrain(cfg: Config, rt: Runtime, run: Pretraining, step: int, skipped_steps: int) -> tuple[int, int | None]:
    """Optimizer steps from `step` to run.total_steps. Returns (last step, None) when done, or
    (step, exit code) when a signal (0) or a streak of non-finite losses (3) stopped the run."""
    stop = GracefulStop()
    metrics = MetricsLogger(cfg.output_dir, run.total_steps, step, enabled=rt.rank == 0)
    run.guard.total = skipped_steps
    window = LogWindow(rt.device, cfg.log_every, run.total_steps, rt.micro_batch, rt.accum_steps, rt.world_size)
    micro_step = step * rt.accum_steps  # index into the endless stream of micro-batches
    diversity = {}  # device scalars from the last collapse probe, read at the next log
    while step < run.total_steps:
        epoch, offset = divmod(micro_step, run.loader.steps_per_epoch)
        for batch in run.loader.iter_from(epoch, offset):
            images = batch["images"].to(rt.device, non_blocking=True)  # (B, 3, H, W) fp32
            target = run.teacher(images)  # (B, N, C) fp32, no grad
            mask = rank_mask(cfg, rt, run.num_patches, micro_step)  # ids_keep (B, V), ids_masked (B, M)
            lr = set_schedule(cfg, run, step)
            pred = run.engine(images.to(rt.dtype), mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
            loss = run.loss_fn(pred, target, mask.ids_masked, cfg.loss_beta, cfg.loss_eps)
            if cfg.diversity_every and micro_step % (cfg.diversity_every * rt.accum_steps) == 0:
                diversity = collapse_probe(pred, target, mask.ids_masked)  # step 0: the teacher's, at start
            run.engine.backward(loss)
            finite = run.guard.check(loss)
            if (micro_step + 1) % rt.accum_steps == 0:  # the optimizer steps in engine.step() below
                run.guard.arm()
            run.engine.step()  # updates only at the accumulation boundary
            window.add(loss, finite)
            micro_step += 1
            if micro_step % rt.accum_steps:
                continue
            step += 1
            run.guard.end_step()
            metrics.advance()
            if window.due(step) and not log_window(cfg, step, lr, epoch, window, run.guard, diversity, metrics):
                metrics.close()
                return step, 3
            if run.knn is not None and (step % cfg.eval_every == 0 or step == run.total_steps):
                metrics.log(step, run.knn(run.engine.module.encoder, rt.device, rt.dtype))  # every rank: ZeRO-3 gathers
            stopping = stop.requested
            if rt.world_size > 1:  # all ranks must stop at the same step: agree where they sync anyway
                stopping = step % cfg.log_every == 0 and agree_any(stopping, rt.device)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == run.total_steps or stopping:
                save_checkpoint(run.engine, cfg.output_dir, step,  # the last good weights: skips change nothing
                                {"config": cfg.to_dict(), "skipped_steps": run.guard.total}, cfg.keep_last)
            if stopping:
                metrics.close()
                log.warning("stopped by %s at step %d; checkpoint written. Rerun the same command to resume",
                            stop.signal_name or "a signal on another rank", step)
                return step, 0
            if step == run.total_steps:
                break
    metrics.close()
    return step, None


def rank_mask(cfg: Config, rt: Runtime, num_patches: int, micro_step: int):
    """This rank's rows of the global batch's masks: a function of (seed, micro_step) only, so
    the masks do not depend on the world size."""
    noise = mask_noise(rt.micro_batch * rt.world_size, num_patches, cfg.seed, micro_step)  # (B * W, N)
    rows = noise[rt.rank * rt.micro_batch:(rt.rank + 1) * rt.micro_batch]  # (B, N)
    return random_masking(rt.micro_batch, num_patches, cfg.mask_ratio, device=rt.device, noise=rows)


def set_schedule(cfg: Config, run: Pretraining, step: int) -> float:
    """Warmup + cosine LR and cosine weight decay for optimizer step `step`; returns the LR."""
    lr = cosine_schedule(step, run.total_steps, run.warmup_steps, run.peak_lr, cfg.min_lr)
    final_wd = cfg.weight_decay if cfg.weight_decay_end < 0 else cfg.weight_decay_end
    set_lr_wd(run.optimizer, lr, cosine_schedule(step, run.total_steps, 0, cfg.weight_decay, final_wd))
    return lr


def log_window(cfg: Config, step: int, lr: float, epoch: int, window: LogWindow, guard: NonFiniteGuard,
               diversity: dict, metrics: MetricsLogger) -> bool:
    """Log the window's metrics (the host sync of a log interval); False: stop, the loss has not
    been finite for max_nonfinite_steps steps in a row."""
    n_skipped, in_a_row = guard.read()
    row = window.close(step, n_skipped)
    metrics.log(step, {"loss": row["loss"], "lr": lr, "epoch": epoch, "img_per_s": row["img_per_s"],
                       "skipped_steps": guard.total, **({"skipped": n_skipped} if n_skipped else {}),
                       **{name: value.item() for name, value in diversity.items()}})
    if n_skipped:
        log.warning("step %d: %d step(s) skipped for a non-finite loss (%d in all)", step, n_skipped, guard.total)
    if guard.exhausted(in_a_row):
        log.error("the loss was not finite for %d steps in a row (up to step %d): stopping. The last good "
                  "checkpoint is in %s; lower base_lr or check the data, then rerun to resume", in_a_row, step,
                  os.path.join(cfg.output_dir, "checkpoints"))
        return False
    return True


# --- The end of a run -------------------------------------------------------------------------


def report_skipped_files(loader, rank: int, data_path: str) -> None:
    from dataloading.sources import escape_name  # a newline in a file name must not forge a log line

    skipped_files = loader.skipped_files()  # (file, reason) of each unreadable image this rank skipped
    if skipped_files:
        log.warning("rank %d skipped %d unreadable file(s), e.g. %s (%s); python -m dataloading.verify %s "
                    "lists them", rank, len(skipped_files), escape_name(skipped_files[0][0]), skipped_files[0][1],
                    data_path or "<data_path>")


def export(cfg: Config, rt: Runtime, run: Pretraining, step: int) -> None:
    """fp32 master weights of the encoder with timm's names, and the loss curve (rank 0)."""
    dist.barrier()
    if rt.rank == 0:
        state = consolidated_fp32_state_dict(cfg.output_dir, step_tag(step), run.frozen)
        path = export_encoder(state, run.timm_kwargs, cfg.output_dir)
        plot_loss_curve(os.path.join(cfg.output_dir, "metrics.jsonl"), os.path.join(cfg.output_dir, "loss.png"))
        log.info("done: %d steps; encoder at %s; resume or extend with --max_steps N", step, path)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
