"""Rank-0 metrics: progress bar, JSONL lines, TensorBoard scalars, and the loss-curve PNG."""
import json
import os
import time

from tqdm import tqdm


class MetricsLogger:
    """Writes only on rank 0; other ranks get a logger whose methods do nothing."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, desc: str = "pretrain"):
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.jsonl = open(self.jsonl_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self.last_step, self.last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.tb.add_scalar(f"train/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}",
                                 lr=f"{metrics['lr']:.2e}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def plot_loss_curve(jsonl_path: str, png_path: str) -> None:
    """Loss (and LR on a second axis) against optimizer step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    with open(jsonl_path) as f:
        rows = [row for row in map(json.loads, filter(str.strip, f)) if "loss" in row]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked feature loss (smooth-L1)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:gray", alpha=0.5, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("Img2Vec pretraining")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
