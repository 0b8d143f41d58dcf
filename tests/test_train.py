"""img2vec/train.py: end to end in real processes under real DeepSpeed engines (gloo, CPU), each run
a tiny student on 64 real JPEGs, a few optimizer steps, fp32; and its command line and step-loop
helpers in process.
"""
import json
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from train_helpers import REPO, TRAIN, checkpoint_dir, losses, step_tag, train, write_ds_config

from img2vec.config import Config
from img2vec.loop import LogWindow, NonFiniteGuard
from img2vec.vit import build_student


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_runs_three_steps_and_writes_every_artifact(stage, data_dir, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, write_ds_config(tmp_path / "ds.json", stage, 8), "--max_steps", "3")
    assert sorted(losses(run)) == [1, 2, 3] and all(map(torch.isfinite, map(torch.tensor, losses(run).values())))
    assert (Path(checkpoint_dir(str(run))) / "latest").read_text() == step_tag(3)
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 8

    # The export loads into timm strictly, and timm's features equal ours.
    meta = json.loads((run / "encoder.json").read_text())
    weights = load_file(str(run / "encoder.safetensors"))
    timm_vit = VisionTransformer(**meta["timm_kwargs"]).eval()
    timm_vit.load_state_dict(weights, strict=True)
    ours = build_student("vit_tiny", 32, 8, 128, 1, 32, 2).encoder.eval()
    ours.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), timm_vit.forward_features(images), atol=1e-5, rtol=0)


@pytest.mark.e2e
def test_resume_gives_the_weights_of_an_uninterrupted_run(data_dir, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", 2, 8)
    run = tmp_path / "run"
    train(run, data_dir, ds, "--max_steps", "4", "--ckpt_every", "2")
    straight = load_file(str(run / "encoder.safetensors"))
    straight_losses = losses(run)

    # Roll back to the step-2 checkpoint as if the job had died after writing it, then rerun.
    shutil.rmtree(Path(checkpoint_dir(str(run))) / step_tag(4))
    Path(checkpoint_dir(str(run)), "latest").write_text(step_tag(2))
    (run / "encoder.safetensors").unlink()
    (run / "metrics.jsonl").write_text("")
    proc = train(run, data_dir, ds, "--max_steps", "4", "--ckpt_every", "2")
    assert "resumed from" in proc.stderr + proc.stdout
    assert sorted(losses(run)) == [3, 4] and all(losses(run)[s] == straight_losses[s] for s in (3, 4))
    resumed = load_file(str(run / "encoder.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.e2e
def test_a_resume_logs_what_changed_keeps_one_config_per_launch_and_no_duplicate_metrics(data_dir, tmp_path):
    run, ds = tmp_path / "run", write_ds_config(tmp_path / "ds.json", 2, 8)
    train(run, data_dir, ds, "--max_steps", "4", "--ckpt_every", "2")
    shutil.rmtree(Path(checkpoint_dir(str(run))) / step_tag(4))  # killed before the step-4 checkpoint landed
    proc = train(run, data_dir, ds, "--max_steps", "6", "--ckpt_every", "2")
    assert f"resumed from {Path(checkpoint_dir(str(run))) / step_tag(2)}" in proc.stderr
    assert "resumed with changed settings: max_steps 4 -> 6" in proc.stderr
    assert "the LR schedule changes at step 2: 4 -> 6 steps in all" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the first launch were dropped, then logged again
    assert [r for r in rows if r.get("event") == "resumed"] == [
        {"step": 2, "event": "resumed", "total_steps": 6, "previous_total_steps": 4}]
    assert {p.name for p in run.glob("config*.yaml")} == {"config.yaml", "config.000000.yaml", "config.000002.yaml"}


@pytest.mark.e2e
def test_two_processes_zero3_match_one_process_at_the_same_global_batch(data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, data_dir, write_ds_config(tmp_path / "ds8.json", 3, 8), "--max_steps", "4")
    train(two, data_dir, write_ds_config(tmp_path / "ds4.json", 3, 4), "--max_steps", "4", nproc=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    wa, wb = load_file(str(one / "encoder.safetensors")), load_file(str(two / "encoder.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_bad_config_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), "--ds_config", "configs/ds_zero2.json", "--mask_ratio", "1.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: mask_ratio must be in (0, 1), got 1.5"]


@pytest.mark.e2e
def test_triton_loss_matches_reference_step_by_step_in_the_trainer(data_dir, tmp_path):
    # On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py); fp32 both ways.
    ds = write_ds_config(tmp_path / "ds.json", 2, 8)
    train(tmp_path / "ref", data_dir, ds, "--max_steps", "3", "--loss_impl", "reference")
    proc = train(tmp_path / "tri", data_dir, ds, "--max_steps", "3", "--loss_impl", "triton")
    assert "loss triton" in proc.stderr
    ref, tri = losses(tmp_path / "ref"), losses(tmp_path / "tri")
    assert sorted(ref) == sorted(tri) == [1, 2, 3]
    assert all(abs(ref[s] - tri[s]) <= 1e-5 for s in ref), (ref, tri)


@pytest.mark.e2e
def test_vit_huge_engine_config_trains_a_scaled_down_model_on_two_processes(data_dir, tmp_path):
    # The ViT-H recipe's engine (ZeRO-3) and activation checkpointing on every block, at tiny size.
    run = tmp_path / "run"
    train(run, data_dir, REPO / "configs" / "ds_zero3_vit_huge.json", "--grad_ckpt", "12", "--max_steps", "2",
          nproc=2)
    assert sorted(losses(run)) == [1, 2]
    shards = list((Path(checkpoint_dir(str(run))) / step_tag(2)).glob("*optim_states.pt"))
    assert len(shards) == 2 and (run / "encoder.safetensors").exists()


@pytest.mark.e2e
def test_in_training_knn_is_logged_every_eval_every_steps(data_dir, tmp_path):
    eval_data = tmp_path / "eval"
    eval_data.mkdir()
    for split in ("train", "val"):  # the sample photographs' source names are the labels
        (eval_data / split).symlink_to(data_dir, target_is_directory=True)
    run = tmp_path / "run"
    train(run, data_dir, write_ds_config(tmp_path / "ds.json", 2, 8), "--max_steps", "2",
          "--eval_every", "1", "--eval_data", str(eval_data))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert knn[0]["knn_top5"] >= knn[0]["knn_top1"]


def rows_without_timing(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


@pytest.mark.e2e
def test_batch_size_flag_overrides_the_json_and_a_rerun_is_bitwise_equal(data_dir, tmp_path):
    # The same run twice, its batch once from the JSON and once from --batch_size: a fixed seed gives
    # the same metrics and the same weight bits (what guards a refactor of the loop against drift).
    json_batch, flag_batch = tmp_path / "json", tmp_path / "flag"
    train(json_batch, data_dir, write_ds_config(tmp_path / "ds8.json", 1, 8), "--max_steps", "3")
    train(flag_batch, data_dir, write_ds_config(tmp_path / "ds2.json", 1, 2), "--max_steps", "3", "--batch_size", "8")
    assert json.loads((flag_batch / "ds_config.json").read_text())["train_batch_size"] == 8
    assert "batch_size: 8\n" in (flag_batch / "config.yaml").read_text()
    assert rows_without_timing(json_batch) == rows_without_timing(flag_batch) and len(losses(flag_batch)) == 3
    a, b = load_file(str(json_batch / "encoder.safetensors")), load_file(str(flag_batch / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_lists_every_config_key_grouped_with_type_and_default():
    proc = run_train("--help")
    assert proc.returncode == 0
    for group in ("model", "teacher", "data", "optimization", "run"):
        assert f"{group} keys:" in proc.stdout
    for f in fields(Config):
        assert f"--{f.name}" in proc.stdout, f.name
    assert "(int, default: 0)" in proc.stdout and "--batch_size" in proc.stdout and "--accum_iter" in proc.stdout


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_train("--ds_config", "configs/ds_zero2.json", "--batch-size", "5", "--output_dir", str(tmp_path / "r"),
                     "--print_config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["batch_size"] == 5 and printed["accum_iter"] == 1  # the flag, and the JSON's accumulation
    assert set(printed) == {f.name for f in fields(Config)} and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--base_lr", "nan"], "config error: base_lr must be a finite number, got nan"),
    (["--base_lr", "1e400"], "config error: base_lr must be a finite number, got inf"),
    (["--accum_iter", "-2"], "config error: accum_iter must be >= 0, got -2"),
    (["--ds_config", "nope.json"], "config error: DeepSpeed config not found: nope.json (try configs/ds_zero2.json)"),
    (["--resume", "--max_steps"], "train.py: error: argument --max_steps/--max-steps: expected one argument (see --help)"),
])
def test_start_up_mistakes_exit_2_with_one_line(args, message):
    proc = run_train("--ds_config", "configs/ds_zero2.json", *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message]


def test_yaml_with_a_non_string_key_exits_2_with_one_line(tmp_path):
    (tmp_path / "run.yaml").write_text("1: 2\n")
    proc = run_train("--ds_config", "configs/ds_zero2.json", "--config", str(tmp_path / "run.yaml"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "config keys must be strings, got 1" in proc.stderr


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_guard_skips_counts_and_reports_a_streak_and_the_window_averages_kept_losses(process_group):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard(opt, torch.device("cpu"), world_size=1, max_in_a_row=2, skipped_before=4)
    window = LogWindow(torch.device("cpu"), log_every=3, total_steps=9, micro_batch=2, accum_steps=1, world_size=1)
    weights = []
    for loss in (torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        p.grad = torch.full((2,), loss.item())
        window.add(loss, guard.check(loss))
        guard.arm()
        opt.step()
        guard.end_step()
        weights.append(p.detach().clone())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])  # both skipped, on device
    assert not window.due(2) and window.due(3) and window.due(9)
    assert guard.read() == (2, 2) and guard.total == 6 and guard.exhausted(2)
    row = window.close(3, skipped=2)
    assert row["loss"] == 1.0 and row["img_per_s"] > 0  # the mean over the one kept step
    guard.check(torch.tensor(0.5))
    guard.arm()
    guard.end_step()
    assert guard.read() == (0, 0) and not guard.exhausted(0)  # a finite step ends the streak
