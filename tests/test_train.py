"""img2vec/train.py: end to end in real processes under real DeepSpeed engines (gloo, CPU), each run
a tiny student on 64 real JPEGs, a few optimizer steps, fp32; and its command line and step-loop
helpers in process.

A process start costs seconds (imports, engine set-up), so each training run is made once per
session (train_helpers.shared_dir) and read by every test that needs that run; a test that
resumes a run copies its folder first. Runs write to the relative output_dir "run" inside their
folder, so a copied folder resumes with an unchanged config.
"""
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from train_helpers import (REPO, TRAIN, checkpoint_dir, losses, shared_dir, step_tag, tensorboard_scalars, train,
                           write_ds_config)

import img2vec.train
import img2vec.verdict
from dataloading import sample_dataset_dir
from img2vec.collapse import CollapseAlarm
from img2vec.config import Config
from img2vec.loop import LogWindow, NonFiniteGuard
from img2vec.metrics import read_rows
from img2vec.train import main as train_main
from img2vec.vit import build_student

# The stage-2 run: 4 steps with a checkpoint at step 2, so the resume tests can roll back to it;
# the reference loss by name, so the Triton run is compared with it.
ZERO2_ARGS = ("--max_steps", "4", "--ckpt_every", "2", "--loss_impl", "reference")
ZERO_ARGS = {1: ("--max_steps", "3"), 2: ZERO2_ARGS, 3: ("--max_steps", "3")}
ZERO_STEPS = {1: 3, 2: 4, 3: 3}
# A test may build the shared runs it reads, or wait while another worker builds them.
WAITS_FOR_RUNS = pytest.mark.timeout(600)
WAITS_FOR_TWO_PROCESSES = pytest.mark.timeout(900)


def run_in(folder: Path, data: Path, ds_config: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """train.py with `folder` as its working directory and output_dir "run"; its stderr is kept
    in folder/train.stderr."""
    proc = train(Path("run"), data, ds_config, *extra, nproc=nproc, cwd=folder)
    (folder / "train.stderr").write_text(proc.stderr)
    return proc


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The conftest's 64 sample JPEGs, at one path for every worker: runs that resume or are
    compared with each other read the same data_path."""
    def build(folder: Path) -> None:
        sample_dataset_dir(cache_dir=folder, num_images=64, seed=0)

    return sample_dataset_dir(cache_dir=shared_dir(tmp_path_factory, "train_data", build), num_images=64, seed=0)


def zero_run(tmp_path_factory, data: Path, stage: int) -> Path:
    def build(folder: Path) -> None:
        run_in(folder, data, write_ds_config(folder / "ds.json", stage, 8), *ZERO_ARGS[stage])

    return shared_dir(tmp_path_factory, f"train_zero{stage}", build)


@pytest.fixture(scope="session")
def zero1_run(tmp_path_factory, sample_data) -> Path:
    return zero_run(tmp_path_factory, sample_data, 1)


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, sample_data) -> Path:
    return zero_run(tmp_path_factory, sample_data, 2)


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, sample_data) -> Path:
    return zero_run(tmp_path_factory, sample_data, 3)


@pytest.fixture(scope="session")
def triton_knn_run(tmp_path_factory, sample_data) -> Path:
    """The stage-2 run's settings with the Triton loss, and in-training kNN every 3 of its 4 steps
    (at step 3, and at the last step)."""
    def build(folder: Path) -> None:
        eval_data = folder / "eval"
        eval_data.mkdir()
        for split in ("train", "val"):  # the sample photographs' source names are the labels
            (eval_data / split).symlink_to(sample_data, target_is_directory=True)
        run_in(folder, sample_data, write_ds_config(folder / "ds.json", 2, 8), "--max_steps", "4",
               "--loss_impl", "triton", "--eval_every", "3", "--eval_data", str(eval_data))

    return shared_dir(tmp_path_factory, "train_triton_knn", build)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, sample_data) -> Path:
    """Two processes under the ViT-H recipe's engine (ZeRO-3 as shipped) with activation
    checkpointing on every block, at tiny size; 4 images per process: the stage-3 run's global
    batch of 8, and its gradient clipping, so the two runs' numbers compare."""
    def build(folder: Path) -> None:
        engine = json.loads((REPO / "configs" / "ds_zero3_vit_huge.json").read_text())
        ds = folder / "ds_zero3_vit_huge.json"
        ds.write_text(json.dumps({**engine, "gradient_clipping": 1.0}))
        run_in(folder, sample_data, ds, "--batch_size", "4", "--grad_ckpt", "12", "--max_steps", "3", nproc=2)

    return shared_dir(tmp_path_factory, "train_two_process", build)


@pytest.mark.e2e
@WAITS_FOR_RUNS
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_runs_a_few_steps_and_writes_every_artifact(stage, request):
    run = request.getfixturevalue(f"zero{stage}_run") / "run"
    steps = ZERO_STEPS[stage]
    assert sorted(losses(run)) == list(range(1, steps + 1))
    assert all(map(torch.isfinite, map(torch.tensor, losses(run).values())))
    assert (Path(checkpoint_dir(str(run))) / "latest").read_text() == step_tag(steps)
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
@WAITS_FOR_RUNS
def test_the_collapse_probe_is_logged_once_under_its_step_and_the_alarm_says_why_it_judged_nothing(zero2_run):
    # 4 steps, a log line each, warm-up 0, a probe every 25 steps: the one reading is step 0's, read at step 1.
    run = zero2_run / "run"
    probed = [r for r in read_rows(str(run / "metrics.jsonl")) if "div_pred" in r]
    assert [(r["step"], r["div_step"]) for r in probed] == [(1, 0)]
    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["train/div_pred"] == [(0, pytest.approx(probed[0]["div_pred"]))]
    lines = (zero2_run / "train.stderr").read_text().splitlines()
    shown = [line for line in lines if "pretrain step " in line and "div pred/target" in line]
    assert len(shown) == 1 and "pretrain step 1/4" in shown[0] and "(step 0)" in shown[0], shown  # new once
    summary = [line.split("img2vec: ", 1)[1] for line in lines if "img2vec: collapse alarm" in line]
    assert summary == ["collapse alarm: nothing to judge: the only diversity reading (step 0) came by the end of "
                       "warm-up (step 0), and the next (step 25) needs more than this run's 4 steps"]


@pytest.mark.e2e
@WAITS_FOR_RUNS
def test_resume_gives_the_weights_of_an_uninterrupted_run(zero2_run, sample_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero2_run / "run", run)  # 4 steps, checkpoints at steps 2 and 4
    straight = load_file(str(run / "encoder.safetensors"))
    straight_losses = losses(run)

    # Roll back to the step-2 checkpoint as if the job had died after writing it, then rerun.
    shutil.rmtree(Path(checkpoint_dir(str(run))) / step_tag(4))
    Path(checkpoint_dir(str(run)), "latest").write_text(step_tag(2))
    (run / "encoder.safetensors").unlink()
    (run / "metrics.jsonl").write_text("")
    proc = run_in(tmp_path, sample_data, zero2_run / "ds.json", *ZERO2_ARGS)
    assert "resumed from" in proc.stderr + proc.stdout
    assert sorted(losses(run)) == [3, 4] and all(losses(run)[s] == straight_losses[s] for s in (3, 4))
    resumed = load_file(str(run / "encoder.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.e2e
@WAITS_FOR_RUNS
def test_a_resume_logs_what_changed_keeps_one_config_per_launch_and_no_duplicate_metrics(zero2_run, sample_data,
                                                                                          tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero2_run / "run", run)  # 4 steps, checkpoints at steps 2 and 4
    shutil.rmtree(Path(checkpoint_dir(str(run))) / step_tag(4))  # killed before the step-4 checkpoint landed
    longer = [a if a != ZERO2_ARGS[1] else "6" for a in ZERO2_ARGS]  # --max_steps 4 -> 6
    proc = run_in(tmp_path, sample_data, zero2_run / "ds.json", *longer)
    assert f"resumed from {Path(checkpoint_dir('run')) / step_tag(2)}" in proc.stderr  # the output_dir as given
    assert "resumed with changed settings: max_steps 4 -> 6\n" in proc.stderr  # and nothing else changed
    assert "the LR schedule changes at step 2: 4 -> 6 steps in all" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the first launch were dropped, then logged again
    assert [r for r in rows if r.get("event") == "resumed"] == [
        {"step": 2, "event": "resumed", "total_steps": 6, "previous_total_steps": 4}]
    assert {p.name for p in run.glob("config*.yaml")} == {"config.yaml", "config.000000.yaml", "config.000002.yaml"}


@pytest.mark.e2e
@WAITS_FOR_TWO_PROCESSES
def test_two_processes_zero3_match_one_process_at_the_same_global_batch(zero3_run, two_process_run):
    one, two = zero3_run / "run", two_process_run / "run"
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    wa, wb = load_file(str(one / "encoder.safetensors")), load_file(str(two / "encoder.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


@pytest.mark.e2e
def test_bad_config_exits_2_with_one_line(tmp_path):
    """The real `python img2vec/train.py` path of a start-up error (the others run main in process)."""
    proc = subprocess.run([sys.executable, str(TRAIN), "--ds_config", "configs/ds_zero2.json", "--mask_ratio", "1.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: mask_ratio must be in (0, 1), got 1.5"]


@pytest.mark.e2e
@WAITS_FOR_RUNS
def test_triton_loss_matches_reference_step_by_step_in_the_trainer(zero2_run, triton_knn_run):
    # On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py); fp32 both ways.
    assert "loss triton" in (triton_knn_run / "train.stderr").read_text()
    assert "loss reference" in (zero2_run / "train.stderr").read_text()
    ref, tri = losses(zero2_run / "run"), losses(triton_knn_run / "run")
    assert sorted(ref) == sorted(tri) == [1, 2, 3, 4]
    assert all(abs(ref[s] - tri[s]) <= 1e-5 for s in ref), (ref, tri)


@pytest.mark.e2e
@WAITS_FOR_TWO_PROCESSES
def test_vit_huge_engine_config_trains_a_scaled_down_model_on_two_processes(two_process_run):
    # The ViT-H recipe's engine (ZeRO-3) and activation checkpointing on every block, at tiny size.
    run = two_process_run / "run"
    assert sorted(losses(run)) == [1, 2, 3]
    shards = list((Path(checkpoint_dir(str(run))) / step_tag(3)).glob("*optim_states.pt"))
    assert len(shards) == 2 and (run / "encoder.safetensors").exists()


@pytest.mark.e2e
@WAITS_FOR_RUNS
def test_in_training_knn_is_logged_every_eval_every_steps(triton_knn_run):
    rows = [json.loads(line) for line in (triton_knn_run / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [3, 4]  # every eval_every (3) steps, and at the last step
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in knn)


def rows_without_timing(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


@pytest.mark.e2e
@WAITS_FOR_RUNS
def test_batch_size_flag_overrides_the_json_and_a_rerun_is_bitwise_equal(zero1_run, sample_data, tmp_path):
    # The same run twice, its batch once from the JSON and once from --batch_size: a fixed seed gives
    # the same metrics and the same weight bits (what guards a refactor of the loop against drift).
    json_batch, flag_batch = zero1_run / "run", tmp_path / "run"  # the stage-1 run: micro-batch 8 in its JSON
    run_in(tmp_path, sample_data, write_ds_config(tmp_path / "ds2.json", 1, 2), *ZERO_ARGS[1], "--batch_size", "8")
    assert json.loads((json_batch / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 8
    assert json.loads((flag_batch / "ds_config.json").read_text())["train_batch_size"] == 8
    assert "batch_size: 8\n" in (flag_batch / "config.yaml").read_text()
    assert rows_without_timing(json_batch) == rows_without_timing(flag_batch) and len(losses(flag_batch)) == 3
    a, b = load_file(str(json_batch / "encoder.safetensors")), load_file(str(flag_batch / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DS_ZERO2 = str(REPO / "configs" / "ds_zero2.json")


@pytest.fixture
def run_main(monkeypatch, tmp_path, capsys, caplog):
    """train.py's main(argv) in this process, as `python img2vec/train.py ARGS` from an empty
    folder: returns (exit code, stdout, stderr). The start-up paths tested here stop before the
    process group, logging set-up and anything else global; a warning logged would reach a real
    process's stderr, so it joins stderr here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(TRAIN)])  # argparse's prog: train.py
    monkeypatch.setenv("COLUMNS", "80")  # --help's width when stdout is a pipe
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # a plain python run

    def call(*args: str) -> tuple[int, str, str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            try:
                code = train_main(list(args))
            except SystemExit as e:
                code = e.code
        out = capsys.readouterr()
        logged = "".join(f"{r.name}: {r.getMessage()}\n" for r in caplog.records if r.levelno >= logging.WARNING)
        assert not dist.is_initialized()
        return code, out.out, out.err + logged

    return call


def test_help_lists_every_config_key_grouped_with_type_and_default(run_main):
    code, out, _ = run_main("--help")
    assert code == 0
    for group in ("model", "teacher", "data", "optimization", "run"):
        assert f"{group} keys:" in out
    for f in fields(Config):
        assert f"--{f.name}" in out, f.name
    assert "(int, default: 0)" in out and "--batch_size" in out and "--accum_iter" in out


def test_print_config_prints_the_resolved_config_and_writes_nothing(run_main, tmp_path):
    code, out, err = run_main("--ds_config", DS_ZERO2, "--batch-size", "5", "--output_dir", str(tmp_path / "r"),
                              "--print_config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["batch_size"] == 5 and printed["accum_iter"] == 1  # the flag, and the JSON's accumulation
    assert set(printed) == {f.name for f in fields(Config)} and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--base_lr", "nan"], "config error: base_lr must be a finite number, got nan"),
    (["--base_lr", "1e400"], "config error: base_lr must be a finite number, got inf"),
    (["--accum_iter", "-2"], "config error: accum_iter must be >= 0, got -2"),
    (["--ds_config", "nope.json"], "config error: DeepSpeed config not found: nope.json (try configs/ds_zero2.json)"),
    (["--resume", "--max_steps"], "train.py: error: argument --max_steps/--max-steps: expected one argument (see --help)"),
])
def test_start_up_mistakes_exit_2_with_one_line(run_main, args, message):
    code, _, err = run_main("--ds_config", DS_ZERO2, *args)
    assert code == 2 and err.strip().splitlines() == [message]


def test_yaml_with_a_non_string_key_exits_2_with_one_line(run_main, tmp_path):
    (tmp_path / "run.yaml").write_text("1: 2\n")
    code, _, err = run_main("--ds_config", DS_ZERO2, "--config", str(tmp_path / "run.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "config keys must be strings, got 1" in err


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


def test_the_verdict_goes_to_tensorboard_as_well_as_metrics_jsonl(process_group, tmp_path, monkeypatch):
    """export() at the end of a run, with the checkpoint, the encoder export and the kNN stubbed."""
    monkeypatch.setattr(img2vec.train, "load_fp32_state_dict", lambda path, frozen: {})
    monkeypatch.setattr(img2vec.train, "export_encoder", lambda state, kwargs, out: f"{out}/encoder.safetensors")
    monkeypatch.setattr(img2vec.verdict, "run_verdict", lambda *a, **k: img2vec.verdict.Verdict(61.5, 50.0, "photos"))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 0.5, "lr": 1e-4}) + "\n")
    run = SimpleNamespace(last_checkpoint=None, frozen={}, timm_kwargs={}, alarm=CollapseAlarm(0))
    img2vec.train.export(Config(output_dir=str(tmp_path)), SimpleNamespace(rank=0, device=torch.device("cpu")), run, 7)
    assert read_rows(str(tmp_path / "metrics.jsonl"))[-1] == {"step": 7, "verdict_knn_top1": 61.5,
                                                              "verdict_knn_top1_random_init": 50.0}
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/verdict_knn_top1"] == [(7, 61.5)]
    assert scalars["train/verdict_knn_top1_random_init"] == [(7, 50.0)]


def test_a_warm_up_longer_than_the_run_is_said_with_the_lr_it_stops_at():
    from img2vec.optim import cosine_schedule, warmup_outlasts_run

    assert warmup_outlasts_run(10, 10, 1e-3) is None  # the last step reaches the peak
    assert warmup_outlasts_run(360, 16, 1e-3) is None
    line = warmup_outlasts_run(10, 16, 1e-3)
    assert cosine_schedule(9, 10, 16, 1e-3, 0.0) == 1e-3 * 10 / 16
    assert line == ("the LR warm-up (16 steps) is longer than the run (10 steps): the LR stops at 6.25e-04, short "
                    "of its peak 1.00e-03; lower warmup_epochs or run more steps")
