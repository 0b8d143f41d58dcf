"""Pretrain an Img2Vec ViT: a student regresses a frozen teacher's features on masked patches.

    deepspeed img2vec/train.py --ds_config configs/ds_zero2.json [--config run.yaml] [--key value ...]
    python img2vec/train.py --ds_config configs/ds_zero2.json      # one process, no launcher
    python img2vec/train.py --help                                 # every config key, grouped

With no run config the embedded default runs: a tiny ViT on the bundled sample photographs
against the HOG teacher (no weights needed), a few minutes on a laptop CPU; it ends with a
learning verdict: kNN top-1 of the encoder vs its own random init on held-out photo crops.
Reads top to bottom: main (config, set-up, resume, pretrain, export), then the step loop.
"""
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # start-up without the cycle collector (runtime.end_start_up)
    gc.disable()
if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from img2vec.checkpoint import (export_encoder, frozen_parameters, load_fp32_state_dict, resume_checkpoint,
                                save_checkpoint)
from img2vec.collapse import CollapseAlarm, PendingReading
from img2vec.config import Config
from img2vec.distributed import agree_any
from img2vec.loop import LogWindow, NonFiniteGuard, backward_and_step, report_skipped_files
from img2vec.masking import mask_noise, random_masking
from img2vec.metrics import MetricsLogger, add_scalars, append_event, keep_metrics_until, plot_loss_curve
from img2vec.optim import cosine_schedule, set_lr_wd, warmup_outlasts_run
from img2vec.run_lock import lock_run_dir
from img2vec.runtime import Runtime, end_start_up, entry_config, exit_process, report_user_error, setup_runtime
from img2vec.signals import GracefulStop
from img2vec.token_diversity import collapse_probe

log = logging.getLogger("img2vec")


def main(argv: list[str] | None = None) -> int:
    try:
        entry = entry_config(Config, __doc__.split("\n")[0], argv)  # (ds_config, cfg)
        if entry is None:  # --print_config printed the resolved config
            return 0
        rt, cfg = setup_runtime(*entry)
        lock_run_dir(cfg.output_dir)  # one run per folder, held until exit; before anything slow
        run = build_pretraining(cfg, rt)
        step, skipped_steps = resume(cfg, rt, run)
        end_start_up()  # imports and engine done: the cycle collector back on
        step, exit_code = pretrain(cfg, rt, run, step, skipped_steps)
        if exit_code is not None:  # stopped by a signal (0) or by non-finite losses (3)
            return exit_code
        report_skipped_files(run.loader.skipped_files(), rt.rank, cfg.data_path)
        export(cfg, rt, run, step)
    except Exception as e:
        return report_user_error(e)  # a mistake the user can fix: one line, exit 2; a bug re-raises
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
    alarm: CollapseAlarm  # speaks when div_pred falls below collapse_fraction x div_target after warm-up
    last_checkpoint: str | None = None  # folder of the newest checkpoint this run verified or wrote


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
    total_steps, warmup_steps = schedule_steps(cfg, loader.steps_per_epoch, rt.accum_steps)
    teacher = build_teacher(cfg).to(rt.device)  # frozen, outside the engine (ZeRO must not shard or step it)
    attn_impl = resolve_attn(cfg.attn_impl, rt.device)
    loss_name, loss_fn = resolve_loss(cfg.loss_impl, rt.device, cfg.loss)
    student = build_student_from_config(cfg, teacher.channels, attn_impl).to(rt.device)
    peak_lr = cfg.base_lr * rt.global_batch / 256  # MAE's linear scaling rule
    if (note := warmup_outlasts_run(total_steps, warmup_steps, peak_lr)) and rt.rank == 0:
        log.warning("%s", note)
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
    weights = cfg.teacher_weights or ("random" if teacher.info.kind in ("cnn", "vit") else "none")
    log.info("student %s: %.1fM params (encoder %.1fM), %d patches, mask %.2f; teacher %s %s "
             "(C=%d, weights=%s); attention %s, loss %s, %s on %s; %s, %d steps, peak lr %.2e", cfg.model,
             sizes[0] / 1e6, sizes[1] / 1e6, num_patches, cfg.mask_ratio, cfg.teacher, teacher.info.module,
             teacher.channels, weights, attn_impl, f"{loss_name} {cfg.loss}",
             str(rt.dtype).replace("torch.", ""), rt.device, rt.log_line(), total_steps, peak_lr)
    alarm = CollapseAlarm(warmup_steps, cfg.collapse_fraction, every=cfg.diversity_every)
    return Pretraining(loader, teacher, engine, optimizer, guard, loss_fn, knn, num_patches, total_steps,
                       warmup_steps, peak_lr, frozen, timm_kwargs, alarm)


def schedule_steps(cfg: Config, micro_steps_per_epoch: int, accum_steps: int) -> tuple[int, int]:
    """(total, warmup) optimizer steps: max_steps or epochs over the data; warmup in epochs."""
    total = cfg.max_steps or max(1, cfg.epochs * micro_steps_per_epoch // accum_steps)
    return total, int(cfg.warmup_epochs * micro_steps_per_epoch / accum_steps)


def resume(cfg: Config, rt: Runtime, run: Pretraining) -> tuple[int, int]:
    """Weights, optimizer and position come back; data and masks are functions of (seed, step), so
    the continued run sees exactly what an uninterrupted one would. Only then is anything written:
    a refused checkpoint leaves the run folder as it was. Returns (step, skipped steps so far)."""
    step, skipped_steps = 0, 0
    state = resume_checkpoint(run.engine, cfg.output_dir, cfg.to_dict(), cfg.trust_checkpoint) if cfg.resume else None
    if state is not None:
        step, skipped_steps = state["step"], state.get("skipped_steps", 0)
        run.last_checkpoint = state["path"]
        previous_total = log_changes(state.get("config", {}), cfg, run, step, rt.accum_steps)
    if rt.rank == 0:
        keep_metrics_until(os.path.join(cfg.output_dir, "metrics.jsonl"), step)
        if state is not None:  # loss.png marks where a run resumed, and any change of its length
            append_event(os.path.join(cfg.output_dir, "metrics.jsonl"), step, "resumed",
                         total_steps=run.total_steps, previous_total_steps=previous_total)
        for name in ("config.yaml", f"config.{step:06d}.yaml"):  # the latest, and one per launch
            cfg.save(os.path.join(cfg.output_dir, name))
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(rt.ds_config, f, indent=2)
    return step, skipped_steps


def log_changes(saved: dict, cfg: Config, run: Pretraining, step: int, accum_steps: int) -> int:
    """Say what a resumed run changed; a new length stretches or cuts the cosine schedule.
    Returns the previous run's total steps."""
    changed = {k: (saved[k], v) for k, v in cfg.to_dict().items() if k in saved and saved[k] != v}
    if changed:  # info: rank 0 only (every rank logs warnings)
        log.info("resumed with changed settings: %s",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if changed.keys() & {"max_steps", "epochs", "warmup_epochs", "base_lr", "min_lr"}:
        old = Config(**{**cfg.to_dict(), **{k: a for k, (a, _) in changed.items()}})
        old_total, old_warmup = schedule_steps(old, run.loader.steps_per_epoch, accum_steps)
        old_lr = cosine_schedule(step, old_total, old_warmup, run.peak_lr * old.base_lr / cfg.base_lr, old.min_lr)
        new_lr = cosine_schedule(step, run.total_steps, run.warmup_steps, run.peak_lr, cfg.min_lr)
        log.info("the LR schedule changes at step %d: %d -> %d steps in all, lr here %.3g -> %.3g", step,
                    old_total, run.total_steps, old_lr, new_lr)
        return old_total
    return run.total_steps


# --- The step loop ----------------------------------------------------------------------------


def pretrain(cfg: Config, rt: Runtime, run: Pretraining, step: int, skipped_steps: int) -> tuple[int, int | None]:
    """Optimizer steps from `step` to run.total_steps. Returns (last step, None) when done, or
    (step, exit code) when a signal (0) or a streak of non-finite losses (3) stopped the run."""
    stop = GracefulStop()
    metrics = MetricsLogger(cfg.output_dir, run.total_steps, step, enabled=rt.rank == 0)
    run.guard.total = skipped_steps
    window = LogWindow(rt.device, cfg.log_every, run.total_steps, rt.micro_batch, rt.accum_steps, rt.world_size)
    micro_step = step * rt.accum_steps  # index into the endless stream of micro-batches
    probe = PendingReading()  # the last collapse probe's device scalars, read once at the next log
    while step < run.total_steps:
        epoch, offset = divmod(micro_step, run.loader.steps_per_epoch)
        for batch in run.loader.iter_from(epoch, offset):
            images = batch["images"].to(rt.device, non_blocking=True)  # (B, 3, H, W) fp32
            target = run.teacher(images)  # (B, N, C) view of the feature map (bf16 on CUDA), no grad
            mask = rank_mask(cfg, rt, run.num_patches, micro_step)  # ids_keep (B, V), ids_masked (B, M)
            lr = set_schedule(cfg, run, step)
            pred = run.engine(images.to(rt.dtype), mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
            loss = run.loss_fn(pred, target, mask.ids_masked, cfg.loss_beta, cfg.loss_eps)
            if cfg.diversity_every and micro_step % (cfg.diversity_every * rt.accum_steps) == 0:
                probe.hold(step, collapse_probe(pred, target, mask.ids_masked))  # step 0: the teacher's, at start
            backward_and_step(run.engine, run.guard, window, loss, (micro_step + 1) % rt.accum_steps == 0)
            micro_step += 1
            if micro_step % rt.accum_steps:
                continue
            step += 1
            run.guard.end_step()
            metrics.advance()
            if window.due(step) and not log_window(cfg, step, lr, epoch, window, run.guard, probe, metrics, run.alarm):
                metrics.close()
                return step, 3
            if run.knn is not None and (step % cfg.eval_every == 0 or step == run.total_steps):
                metrics.log(step, run.knn(run.engine.module.encoder, rt.device, rt.dtype))  # every rank: ZeRO-3 gathers
            stopping = stop.requested
            if rt.world_size > 1:  # all ranks must stop at the same step: agree where they sync anyway
                stopping = step % cfg.log_every == 0 and agree_any(stopping, rt.device)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == run.total_steps or stopping:
                saved = save_checkpoint(run.engine, cfg.output_dir, step,  # the last good weights: skips change nothing
                                        {"config": cfg.to_dict(), "skipped_steps": run.guard.total}, cfg.keep_last)
                run.last_checkpoint = saved or run.last_checkpoint  # None: weights not finite, nothing written
            if stopping:
                metrics.close()
                log.warning("stopped by %s at step %d; %s. Rerun the same command to resume",
                            stop.signal_name or "a signal on another rank", step,
                            "checkpoint written" if saved else "no checkpoint written (weights not finite)")
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
               probe: PendingReading, metrics: MetricsLogger, alarm: CollapseAlarm) -> bool:
    """Log the window's metrics (the host sync of a log interval); False: stop, the loss has not
    been finite for max_nonfinite_steps steps in a row."""
    n_skipped, in_a_row = guard.read()
    row = window.close(step, n_skipped)
    reading = probe.take()  # {div_pred, div_target, div_step}: a probe since the last log, else {}
    metrics.log(step, {"loss": row["loss"], "lr": lr, "epoch": epoch, "img_per_s": row["img_per_s"],
                       "skipped_steps": guard.total, **({"skipped": n_skipped} if n_skipped else {}), **reading})
    if reading:
        alarm.update(reading["div_step"], reading["div_pred"], reading["div_target"])  # warns once per low window
    if n_skipped:
        log.warning("step %d: %d step(s) skipped for a non-finite loss (%d in all)", step, n_skipped, guard.total)
    if guard.exhausted(in_a_row):
        log.error("the loss was not finite for %d steps in a row (up to step %d): stopping. The last good "
                  "checkpoint is in %s; lower base_lr or check the data, then rerun to resume", in_a_row, step,
                  os.path.join(cfg.output_dir, "checkpoints"))
        return False
    return True


# --- The end of a run -------------------------------------------------------------------------


def export(cfg: Config, rt: Runtime, run: Pretraining, step: int) -> None:
    """fp32 master weights of the encoder with timm's names, and the loss curve (rank 0)."""
    dist.barrier()
    if rt.rank == 0:
        state = load_fp32_state_dict(run.last_checkpoint, run.frozen)  # verified before it unpickles
        path = export_encoder(state, run.timm_kwargs, cfg.output_dir)
        plot_loss_curve(os.path.join(cfg.output_dir, "metrics.jsonl"), os.path.join(cfg.output_dir, "loss.png"))
        log.info("done: %d steps; encoder at %s; resume or extend with --max_steps N", step, path)
        log.info("%s", run.alarm.summary(step))
        if cfg.verdict_data:  # the last line: kNN top-1 of this encoder vs its own random init
            from img2vec.verdict import write_verdict

            verdict = write_verdict(cfg.output_dir, step, cfg.seed, cfg.verdict_data, device=rt.device)  # metrics.jsonl
            add_scalars(cfg.output_dir, step, verdict.metrics())  # and TensorBoard
            log.info("%s", verdict.line())
    dist.barrier()


if __name__ == "__main__":
    exit_process(main())
