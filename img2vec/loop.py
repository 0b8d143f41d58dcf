"""The step-loop helpers pretraining and fine-tuning share: the non-finite guard, the guarded
backward + step of one micro-step, the log window, and the end-of-run count of unreadable files.

Both keep their counters on the device and read them only at log intervals: the loop never
waits for the GPU between steps (nanoGPT's rule; MAE's per-step `loss.item()` is what we avoid).
"""
import logging
import os
import time

import torch
import torch.distributed as dist

from img2vec.optim import skip_step_if

log = logging.getLogger("img2vec")


class NonFiniteGuard:
    """Skip every optimizer step whose accumulation window saw a non-finite loss, on the device;
    count the skips; report how many came in a row (the run stops after `max_in_a_row`).

    Per micro-step: `check(loss)`. At the accumulation boundary, before `engine.step()`: `arm()`.
    After the optimizer step: `end_step()`. At a log interval (a host sync): `read()`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, world_size: int,
                 max_in_a_row: int, skipped_before: int = 0):
        self.optimizer = optimizer  # the torch optimizer itself (DeepSpeed's wrapper has no found_inf)
        self.world_size, self.max_in_a_row = world_size, max_in_a_row
        self.nonfinite = torch.zeros((), device=device)  # non-finite losses in this accumulation window
        self.window = torch.zeros((), device=device)  # skipped steps in this log window
        self.in_a_row = torch.zeros((), device=device)  # skipped steps in a row, up to now
        self.total = skipped_before  # skipped steps in the whole run (host int, updated by read())

    def check(self, loss: torch.Tensor) -> torch.Tensor:
        """Count a non-finite micro-step loss; returns the device bool `finite`."""
        finite = torch.isfinite(loss.detach())
        self.nonfinite += ~finite
        return finite

    def arm(self) -> None:
        """Make the coming optimizer step a no-op if any rank saw a non-finite loss in this window."""
        if self.world_size > 1:
            dist.all_reduce(self.nonfinite)  # every rank skips the same steps (async on GPU)
        skip_step_if(self.optimizer, self.nonfinite)

    def end_step(self) -> None:
        was_skipped = (self.nonfinite > 0).float()
        self.window += was_skipped
        self.in_a_row = (self.in_a_row + 1) * was_skipped
        self.nonfinite.zero_()

    def read(self) -> tuple[int, int]:
        """(skipped in this log window, skipped in a row now); a host sync: call at log intervals."""
        n, in_a_row = int(self.window.item()), int(self.in_a_row.item())
        self.total += n
        self.window.zero_()
        return n, in_a_row

    def exhausted(self, in_a_row: int) -> bool:
        return in_a_row >= self.max_in_a_row


def backward_and_step(engine, guard: NonFiniteGuard, window: "LogWindow", loss: torch.Tensor,
                      boundary: bool) -> None:
    """One micro-step after the forward: DeepSpeed's backward and step, the guard and the log window.

    `boundary`: this micro-step ends an accumulation window, so engine.step() updates the weights;
    the guard first makes that update a no-op on every rank if any micro-step of the window had a
    non-finite loss. Device ops only, no host sync.
    """
    engine.backward(loss)
    finite = guard.check(loss)
    if boundary:
        guard.arm()
    engine.step()  # updates only at the accumulation boundary
    window.add(loss, finite)


class LogWindow:
    """The mean loss and throughput of the optimizer steps since the last log line.

    `add(loss, finite)` per micro-step (device ops only); `due(step)` says when to log;
    `close(step, skipped)` all-reduces (the sync point, once per log interval) and starts a new window.
    """

    def __init__(self, device: torch.device, log_every: int, total_steps: int, micro_batch: int,
                 accum_steps: int, world_size: int):
        self.log_every, self.total_steps = log_every, total_steps
        self.accum_steps, self.world_size = accum_steps, world_size
        self.images_per_micro_step = micro_batch * world_size
        self.loss_sum = torch.zeros((), device=device)  # accumulated on device: no per-step host sync
        self.start, self.images = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        """A micro-step's loss; a non-finite one (finite False) adds nothing."""
        self.loss_sum += loss.detach() if finite is None else torch.where(finite, loss.detach(), 0.0)
        self.images += self.images_per_micro_step

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def close(self, step: int, skipped: int = 0) -> dict:
        """{"loss": mean over the kept micro-steps of all ranks, "img_per_s"}; resets the window.
        Without a kept step the loss is 0.0 and the row's "skipped" says so."""
        dist.all_reduce(self.loss_sum)  # the sync point: once per log interval
        steps = self.log_every if step % self.log_every == 0 else step % self.log_every
        kept = max(1, (steps - skipped) * self.accum_steps * self.world_size)
        row = {"loss": self.loss_sum.item() / kept,
               "img_per_s": self.images / (time.perf_counter() - self.start)}
        self.loss_sum.zero_()
        self.start, self.images = time.perf_counter(), 0
        return row


def log_window(step: int, window: LogWindow, guard: NonFiniteGuard, metrics, extra: dict, output_dir: str) -> bool:
    """Log the window's loss and throughput with `extra` (lr, epoch, ...) to `metrics` (a
    MetricsLogger): the host sync of a log interval. False: stop, the loss has not been finite for
    guard.max_in_a_row steps in a row (the last good checkpoint is in output_dir/checkpoints)."""
    n_skipped, in_a_row = guard.read()
    row = window.close(step, n_skipped)
    metrics.log(step, {"loss": row["loss"], **extra, "img_per_s": row["img_per_s"], "skipped_steps": guard.total,
                       **({"skipped": n_skipped} if n_skipped else {})})
    if n_skipped:
        log.warning("step %d: %d step(s) skipped for a non-finite loss (%d in all)", step, n_skipped, guard.total)
    if guard.exhausted(in_a_row):
        log.error("the loss was not finite for %d steps in a row (up to step %d): stopping. The last good "
                  "checkpoint is in %s; lower base_lr or check the data, then rerun to resume", in_a_row, step,
                  os.path.join(output_dir, "checkpoints"))
        return False
    return True


def report_skipped_files(skipped_files: list[tuple[str, str]], rank: int, data_path: str) -> None:
    """One warning at the end of a run: how many unreadable files this rank skipped, the first one
    and its reason, and the command that lists them all. skipped_files: (file, reason) pairs."""
    from dataloading.sources import escape_name  # a newline in a file name must not forge a log line

    if skipped_files:
        log.warning("rank %d skipped %d unreadable file(s), e.g. %s (%s); python -m dataloading.verify %s "
                    "lists them", rank, len(skipped_files), escape_name(skipped_files[0][0]), skipped_files[0][1],
                    data_path or "<data_path>")
