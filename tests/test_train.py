"""End to end: img2vec/train.py in real processes under real DeepSpeed engines (gloo, CPU).

Each run is a tiny student on 64 real JPEGs, a few optimizer steps, fp32.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from train_helpers import REPO, TRAIN, checkpoint_dir, losses, step_tag, train, write_ds_config

from img2vec.vit import build_student


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_runs_three_steps_and_writes_every_artifact(stage, data_dir, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, write_ds_config(tmp_path / "ds.json", stage, 8), "--max_steps", "3")
    assert sorted(losses(run)) == [1, 2, 3] and all(map(torch.isfinite, map(torch.tensor, losses(run).values())))
    assert (checkpoint_dir(str(run)) + "/latest") and open(checkpoint_dir(str(run)) + "/latest").read() == step_tag(3)
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


def test_triton_loss_matches_reference_step_by_step_in_the_trainer(data_dir, tmp_path):
    # On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py); fp32 both ways.
    ds = write_ds_config(tmp_path / "ds.json", 2, 8)
    train(tmp_path / "ref", data_dir, ds, "--max_steps", "3", "--loss_impl", "reference")
    proc = train(tmp_path / "tri", data_dir, ds, "--max_steps", "3", "--loss_impl", "triton")
    assert "loss triton" in proc.stderr
    ref, tri = losses(tmp_path / "ref"), losses(tmp_path / "tri")
    assert sorted(ref) == sorted(tri) == [1, 2, 3]
    assert all(abs(ref[s] - tri[s]) <= 1e-5 for s in ref), (ref, tri)


def test_vit_huge_engine_config_trains_a_scaled_down_model_on_two_processes(data_dir, tmp_path):
    # The ViT-H recipe's engine (ZeRO-3) and activation checkpointing on every block, at tiny size.
    run = tmp_path / "run"
    train(run, data_dir, REPO / "configs" / "ds_zero3_vit_huge.json", "--grad_ckpt", "12", "--max_steps", "2",
          nproc=2)
    assert sorted(losses(run)) == [1, 2]
    shards = list((Path(checkpoint_dir(str(run))) / step_tag(2)).glob("*optim_states.pt"))
    assert len(shards) == 2 and (run / "encoder.safetensors").exists()


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
