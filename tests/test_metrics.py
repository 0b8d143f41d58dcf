"""What a person reads of a run: progress lines in a log file, kNN printed, the loss curve's panels,
legends and resume markers, the visualize colour bar's label."""
import json
import logging

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from img2vec.metrics import MetricsLogger, append_event, loss_figure, plot_loss_curve, read_rows, restarts  # noqa: E402
from train_helpers import tensorboard_scalars  # noqa: E402


def interval(step: int, **extra) -> dict:
    return {"loss": 1.0 / step, "lr": 1e-3, "epoch": 0, "img_per_s": 50.0, "skipped_steps": 0, **extra}


def test_a_log_file_gets_one_plain_line_per_log_interval_and_the_knn_result(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="img2vec")
    metrics = MetricsLogger(str(tmp_path), total_steps=20, start_step=0, enabled=True)
    assert metrics.bar is None  # under pytest stderr is not a terminal: no tqdm bar
    for step in range(1, 21):
        metrics.advance()
        if step % 5 == 0:
            metrics.log(step, interval(step, div_pred=0.25, div_target=0.5))
    metrics.log(20, {"knn_top1": 70.8888888, "knn_top5": 97.3333333})
    metrics.close()
    lines = [r.getMessage() for r in caplog.records]
    progress = [line for line in lines if line.startswith("pretrain step ")]
    assert [line.split()[2] for line in progress] == ["5/20", "10/20", "15/20", "20/20"]
    assert "loss 0.2000" in progress[0] and "div pred/target 0.250/0.500" in progress[0] and "eta " in progress[0]
    assert all("\r" not in line and len(line) < 200 for line in lines)
    assert "step 20: knn top-1 70.89%  top-5 97.33%" in lines
    rows = read_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 20] and rows[-1]["knn_top1"] == 70.8888888


def test_a_probe_reading_is_shown_once_and_goes_to_tensorboard_at_the_step_it_was_taken(tmp_path, caplog):
    """The collapse probe reads at step 0 and 25, and each reading is logged at the next log interval
    (steps 5 and 30): TensorBoard puts it at its own step, the progress line names that step."""
    caplog.set_level(logging.INFO, logger="img2vec")
    metrics = MetricsLogger(str(tmp_path), total_steps=30, start_step=0, enabled=True, bar=False)
    metrics.log(5, interval(5, div_pred=0.25, div_target=0.5, div_step=0))
    metrics.log(10, interval(10))
    metrics.log(30, interval(30, div_pred=0.375, div_target=0.75, div_step=25))
    metrics.close()
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain step ")]
    assert "div pred/target 0.250/0.500 (step 0)" in progress[0] and "div" not in progress[1]
    assert "div pred/target 0.375/0.750 (step 25)" in progress[2]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/div_pred"] == [(0, 0.25), (25, 0.375)]
    assert scalars["train/div_target"] == [(0, 0.5), (25, 0.75)]
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 30] and "train/div_step" not in scalars
    assert [r.get("div_step") for r in read_rows(str(tmp_path / "metrics.jsonl"))] == [0, None, 25]


def test_a_terminal_gets_the_bar_and_no_progress_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="img2vec")
    metrics = MetricsLogger(str(tmp_path), total_steps=10, start_step=0, enabled=True, bar=True)
    metrics.log(5, interval(5))
    metrics.log(5, {"knn_top1": 50.0})
    metrics.close()
    lines = [r.getMessage() for r in caplog.records]
    assert not any(line.startswith("pretrain step") for line in lines) and "step 5: knn top-1 50.00%" in lines


def test_events_are_rows_without_a_loss(tmp_path):
    metrics = MetricsLogger(str(tmp_path), total_steps=10, start_step=4, enabled=True, bar=False)
    metrics.event(4, "resumed", total_steps=10, previous_total_steps=8)
    metrics.close()
    append_event(str(tmp_path / "metrics.jsonl"), 6, "resumed", total_steps=12)
    assert read_rows(str(tmp_path / "metrics.jsonl")) == [
        {"step": 4, "event": "resumed", "total_steps": 10, "previous_total_steps": 8},
        {"step": 6, "event": "resumed", "total_steps": 12}]
    assert not MetricsLogger(str(tmp_path / "other"), 10, 0, enabled=False).enabled  # other ranks: nothing
    assert not (tmp_path / "other").exists()


def test_restarts_come_from_resumed_rows_or_from_steps_logged_again():
    rows = [{"step": s, "loss": 1.0} for s in (5, 10, 15)]
    rows += [{"step": 10, "event": "resumed", "total_steps": 20, "previous_total_steps": 20}]
    rows += [{"step": s, "loss": 1.0} for s in (15, 20)]
    rows += [{"step": 20, "event": "resumed", "total_steps": 30, "previous_total_steps": 20}]
    rows += [{"step": 20, "event": "resumed", "total_steps": 30, "previous_total_steps": 30}]  # killed again
    assert restarts(rows) == [(10, "resumed"), (20, "extended to 30 steps")]
    assert restarts([{"step": 5, "event": "resumed", "total_steps": 8, "previous_total_steps": 10}]) == [
        (5, "shortened to 8 steps")]
    # A file from before the "resumed" rows: a rerun from the step-10 checkpoint logs 15 again.
    old = [{"step": s, "loss": 1.0} for s in (5, 10, 15, 15, 20)]
    assert restarts(old) == [(15, "restarted")]
    assert restarts([{"step": s, "loss": 1.0} for s in (5, 10, 15)]) == []


def test_the_loss_figure_shows_diversity_knn_and_markers_with_legends():
    rows = [{"step": s, **interval(s, div_pred=0.2, div_target=0.4)} for s in (5, 10, 15, 20)]
    rows.insert(2, {"step": 10, "event": "resumed", "total_steps": 30, "previous_total_steps": 20})
    rows += [{"step": 10, "knn_top1": 40.0, "knn_top5": 80.0}, {"step": 20, "knn_top1": 60.0, "knn_top5": 90.0}]
    rows += [{"step": 20, "verdict_knn_top1": 55.0, "verdict_knn_top1_random_init": 30.0}]
    fig = loss_figure(rows, plt)
    panels = [ax for ax in fig.axes if ax.get_ylabel() != "learning rate"]
    assert [ax.get_ylabel() for ax in panels] == ["masked feature loss", "token diversity", "kNN top-1 (%)"]
    legend = [t.get_text() for t in panels[0].get_legend().get_texts()]
    assert legend == ["loss", "learning rate", "extended to 30 steps"]
    assert [t.get_text() for t in panels[1].get_legend().get_texts()] == ["div_pred (student)", "div_target (teacher)"]
    assert list(panels[2].get_lines()[0].get_ydata()) == [40.0, 60.0]
    assert [t.get_text() for t in panels[2].get_legend().get_texts()] == [
        "kNN top-1 (eval_data)", "verdict: pretrained", "verdict: random init"]
    assert all(10 in [line.get_xdata()[0] for line in ax.get_lines()[1:]] for ax in panels)  # the marker, everywhere
    plt.close(fig)

    plain = loss_figure([{"step": s, **interval(s)} for s in (1, 2)], plt)  # neither diversity nor kNN: one panel
    assert len([ax for ax in plain.axes if ax.get_ylabel() != "learning rate"]) == 1
    plt.close(plain)
    assert loss_figure([{"step": 1, "knn_top1": 5.0}], plt) is None

    probed = [{"step": 5, **interval(5, div_pred=0.2, div_target=0.4, div_step=0)}, {"step": 10, **interval(10)},
              {"step": 30, **interval(30, div_pred=0.3, div_target=0.5, div_step=25)}]
    fig = loss_figure(probed, plt)
    diversity = [ax for ax in fig.axes if ax.get_ylabel() == "token diversity"][0]
    assert [list(line.get_xdata()) for line in diversity.get_lines()] == [[0, 25], [0, 25]]  # where each was taken
    plt.close(fig)


def test_plot_loss_curve_writes_a_png_and_skips_a_torn_last_line(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, **interval(s)}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    plot_loss_curve(str(jsonl), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_visualize_colour_bar_has_a_label():
    from img2vec.visualize import figure

    grid = 4
    masked = torch.zeros(grid * grid, dtype=torch.bool)
    masked[::2] = True
    fig = figure(torch.randn(3, 32, 32), torch.rand(grid * grid) * 2 - 1, masked, grid, "title", plt)
    colour_bar = fig.axes[-1]
    assert len(fig.axes) == 4 and "cosine similarity" in colour_bar.get_ylabel()
    plt.close(fig)


@pytest.mark.parametrize("total, start, step, expected", [(100, 0, 50, "(50%)"), (7, 3, 7, "(100%)")])
def test_progress_line_percent(tmp_path, total, start, step, expected):
    metrics = MetricsLogger(str(tmp_path), total, start, enabled=True, bar=False)
    line = metrics.progress_line(step, {"loss": 0.5})
    metrics.close()
    assert line.startswith(f"pretrain step {step}/{total} {expected}  loss 0.5000")
    assert ("eta" in line) == (step < total)
