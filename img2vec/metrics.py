"""Rank-0 metrics: progress (a tqdm bar on a terminal, a plain line per log interval otherwise),
JSONL rows, TensorBoard scalars, and the loss-curve PNG.

metrics.jsonl holds one JSON object per line, each with "step":
    {"step", "loss", "lr", "img_per_s", ..., "div_pred", "div_target", "div_step"}   a log interval
    {"step", "knn_top1", "knn_top5"}                                      an in-training kNN evaluation
    {"step", "verdict_knn_top1", "verdict_knn_top1_random_init"}          the end-of-run learning verdict
    {"step", "event": "resumed", "total_steps", "previous_total_steps"}   a launch that continued a run
A collapse probe's reading (div_*) is in the first log interval after it, once, with div_step, the
optimizer step it was taken at (<= step). TensorBoard gets each number as train/<name> at the row's
step, a probe's reading at div_step.
"""
import json
import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("img2vec")


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger whose methods do nothing.

    bar: True draws a tqdm bar, False writes one plain log line per log interval (what a log
    file wants: a redrawn bar there is one line of tens of KB); None picks the bar only when
    stderr is a terminal.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, desc: str = "pretrain",
                 bar: bool | None = None):
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.jsonl = open(self.jsonl_path, "a")
        self.desc, self.total_steps = desc, total_steps
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True) if use_bar else None
        self.start_step, self.start_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        """One row of metrics at optimizer step `step`; a row with "loss" is a log interval (progress
        shown), a row with "knn_top1" is printed as a line of its own. A collapse probe's reading
        (div_pred, div_target) goes to TensorBoard at div_step, the step it was taken at."""
        if not self.enabled:
            return
        probe_step = metrics.get("div_step", step)
        for key, value in metrics.items():
            if key != "div_step":
                self.tb.add_scalar(f"train/{key}", value, probe_step if key.startswith("div_") else step)
        self._write({"step": step, **metrics})
        if "loss" in metrics:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}",
                                     lr=f"{metrics['lr']:.2e}")
            else:
                self._say(self.progress_line(step, metrics))
        if "knn_top1" in metrics:
            top5 = f"  top-5 {metrics['knn_top5']:.2f}%" if "knn_top5" in metrics else ""
            self._say(f"step {step}: knn top-1 {metrics['knn_top1']:.2f}%{top5}")

    def event(self, step: int, name: str, **fields) -> None:
        """A row that marks something other than a measurement (e.g. "resumed"); not in TensorBoard."""
        if self.enabled:
            self._write({"step": step, "event": name, **fields})

    def progress_line(self, step: int, metrics: dict) -> str:
        """'pretrain step 40/400 (10%)  loss 0.4123  lr 1.00e-03  img/s 52.1  div pred/target 0.310/0.420
        (step 25)  eta 5m12s', one line: a probe reading names the step it was taken at when not this one."""
        parts = [f"{self.desc} step {step}/{self.total_steps} ({100 * step // max(1, self.total_steps)}%)",
                 f"loss {metrics['loss']:.4f}"]
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "img_per_s" in metrics:
            parts.append(f"img/s {metrics['img_per_s']:.1f}")
        if "div_pred" in metrics and "div_target" in metrics:
            taken = metrics.get("div_step", step)
            parts.append(f"div pred/target {metrics['div_pred']:.3f}/{metrics['div_target']:.3f}"
                         + (f" (step {taken})" if taken != step else ""))
        if metrics.get("skipped"):
            parts.append(f"skipped {metrics['skipped']}")
        done = step - self.start_step
        if 0 < done and step < self.total_steps:
            seconds = int((time.perf_counter() - self.start_time) / done * (self.total_steps - step))
            parts.append(f"eta {_duration(seconds)}")
        return "  ".join(parts)

    def advance(self, n: int = 1) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.tb.close()
            self.jsonl.close()

    def _write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def _say(self, line: str) -> None:
        if self.bar is None:
            log.info("%s", line)
        else:
            with self.bar.external_write_mode(file=sys.stderr):  # the bar steps aside for the line, then redraws
                log.info("%s", line)


def add_scalars(output_dir: str, step: int, scalars: dict[str, float]) -> None:
    """TensorBoard scalars train/<name> at `step` in output_dir/tensorboard, once the run's
    MetricsLogger has closed (rank 0): the end-of-run verdict."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(output_dir, "tensorboard")) as tb:
        for name, value in scalars.items():
            tb.add_scalar(f"train/{name}", value, step)


def append_event(jsonl_path: str, step: int, name: str, **fields) -> None:
    """Append {"step", "event": name, **fields} to metrics.jsonl (rank 0, before the run's logger opens it)."""
    with open(jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, "event": name, **fields}) + "\n")


def _duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# --- The loss curve ---------------------------------------------------------------------------------


def read_rows(jsonl_path: str) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (a run killed mid-write) is left out."""
    rows = []
    with open(jsonl_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def restarts(rows: list[dict]) -> list[tuple[int, str]]:
    """(step, label) of every launch that continued the run: "resumed", or "extended to N steps" /
    "shortened to N steps" when the schedule's length changed. From the "resumed" rows; in a file without them, a logged step that
    is not after the previous one (a rerun from an earlier checkpoint logs those steps again)."""
    marks, total, last = [], None, None
    for row in rows:
        if row.get("event") == "resumed":
            before = row.get("previous_total_steps", total)
            after = row.get("total_steps")
            extended = after is not None and before is not None and after != before
            label = f"{'extended' if after > before else 'shortened'} to {after} steps" if extended else "resumed"
            if marks and marks[-1][0] == row["step"]:  # resumed twice from one checkpoint: one mark
                label = marks.pop()[1] if label == "resumed" else label
            marks.append((row["step"], label))
            total = after if after is not None else total
        elif "event" not in row and "loss" in row:
            if last is not None and row["step"] <= last:
                marks.append((row["step"], "restarted"))
            last = row["step"]
    if any(r.get("event") == "resumed" for r in rows):
        return [m for m in marks if m[1] != "restarted"]
    return marks


def plot_loss_curve(jsonl_path: str, png_path: str) -> None:
    """Loss and LR against optimizer step; below it the token diversity of prediction and target
    and the in-training kNN top-1 when the run logged them; a dashed line where a launch resumed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig = loss_figure(read_rows(jsonl_path), plt)
    if fig is None:
        return
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _latest_per_step(rows: list[dict]) -> list[dict]:
    """Rows sorted by step, the last written one where a rerun logged a step again."""
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def loss_figure(rows: list[dict], plt):
    """The figure of plot_loss_curve (None without a loss row); its axes carry the labels and legends."""
    train = _latest_per_step([r for r in rows if "loss" in r and "event" not in r])
    if not train:
        return None
    div = [r for r in train if "div_pred" in r and "div_target" in r]
    knn = _latest_per_step([r for r in rows if "knn_top1" in r])
    verdict = _latest_per_step([r for r in rows if "verdict_knn_top1" in r])  # the end-of-run learning check
    heights = [3] + [1.6] * (bool(div) + bool(knn or verdict))
    fig, axes = plt.subplots(len(heights), 1, sharex=True, squeeze=False, figsize=(7, 1 + sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    ax = axes[0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], color="tab:blue", label="loss")
    ax.set_ylabel("masked feature loss")
    lines = ax.get_lines()
    if all("lr" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in train], color="tab:gray", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = lines + ax2.get_lines()
    ax.set_title("Img2Vec pretraining")
    panel = 1
    if div:
        d_ax = axes[panel]
        d_steps = [r.get("div_step", r["step"]) for r in div]  # where each reading was taken
        d_ax.plot(d_steps, [r["div_pred"] for r in div], color="tab:red", label="div_pred (student)")
        d_ax.plot(d_steps, [r["div_target"] for r in div], color="tab:green", label="div_target (teacher)")
        d_ax.set_ylabel("token diversity")
        d_ax.legend(loc="best", fontsize=8)
        panel += 1
    if knn or verdict:
        k_ax = axes[panel]
        if knn:
            k_ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", color="tab:purple",
                      label="kNN top-1 (eval_data)")
        if verdict:
            v_steps = [r["step"] for r in verdict]
            k_ax.plot(v_steps, [r["verdict_knn_top1"] for r in verdict], "s", color="tab:blue",
                      label="verdict: pretrained")
            if all("verdict_knn_top1_random_init" in r for r in verdict):
                k_ax.plot(v_steps, [r["verdict_knn_top1_random_init"] for r in verdict], "x", color="tab:gray",
                          label="verdict: random init")
        k_ax.set_ylabel("kNN top-1 (%)")
        k_ax.legend(loc="best", fontsize=8)
    for step, label in restarts(rows):
        for i, a in enumerate(axes):
            line = a.axvline(step, color="black", linestyle="--", linewidth=0.8, label=label)
            if i == 0 and label not in [l.get_label() for l in lines]:
                lines = lines + [line]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def keep_metrics_until(path: str, step: int) -> None:
    """Drop metrics rows past `step` (written after the checkpoint we resume from): no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut short by a kill
        return float("inf")
