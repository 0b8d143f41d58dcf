"""Fault injection in real processes: kills, signals, NaNs, hostile and broken checkpoints.

Each fault is checked against what an uninterrupted run with the same seed produces. That run
(checkpoints at steps 2, 4 and 6) is trained once per session, also under pytest-xdist; the tests
that damage checkpoints work on copies of it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (INJECT, REPO, checkpoint_dir, fault_env, losses, run_train,
                           shared_dir, step_tag, train_args, write_ds_config)

from img2vec.checkpoint import consolidated_fp32_state_dict
from img2vec.optim import skip_step_if

STEPS = ["--max_steps", "6", "--ckpt_every", "2"]


def launch(run: Path, data_dir: Path, ds: Path, *extra: str, **faults: str) -> subprocess.Popen:
    """train.py through the fault injector, running in the background; stdout and stderr in one pipe."""
    return subprocess.Popen([sys.executable, str(INJECT), *train_args(run, data_dir, ds, *extra)], cwd=REPO,
                            env=fault_env(**faults), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, marker: str) -> str:
    """The process's output up to the line holding `marker` (tqdm may precede it on that line)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.wait()
    pytest.fail(f"{marker} never printed (rc {proc.returncode}):\n{''.join(seen)[-3000:]}")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "encoder.safetensors")), load_file(str(b / "encoder.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def loadable(tag_dir: Path) -> bool:
    from img2vec.checkpoint import check_complete

    return tag_dir.is_dir() and check_complete(str(tag_dir)) is None


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_ds_config(tmp_path_factory.mktemp("ds") / "ds.json", 2, 8)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, ds, tmp_path_factory) -> tuple[Path, str]:
    """Six steps, checkpoints at 2, 4 and 6, started in a run folder whose checkpoints/ exists
    empty: the run folder and the run's stderr. Read it or copy it; never change it."""
    def build(folder: Path) -> None:
        run = folder / "run"
        Path(checkpoint_dir(str(run))).mkdir(parents=True)
        (folder / "stderr.txt").write_text(run_train(run, data_dir, ds, *STEPS).stderr)

    folder = shared_dir(tmp_path_factory, "reliability_uninterrupted", build)
    return folder / "run", (folder / "stderr.txt").read_text()


@pytest.fixture
def run_copy(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    return run


@pytest.mark.e2e
def test_an_empty_checkpoints_folder_starts_from_step_0(uninterrupted):
    stderr = uninterrupted[1]
    assert "no complete checkpoint in" in stderr and "starting from step 0" in stderr, stderr[-3000:]


@pytest.mark.e2e
def test_sigkill_while_writing_a_checkpoint_loses_only_the_steps_since_the_last_one(data_dir, ds, uninterrupted,
                                                                                    tmp_path):
    run = tmp_path / "run"
    proc = launch(run, data_dir, ds, *STEPS, slow_save="2")  # the 2nd checkpoint: step 4
    read_until(proc, "FAULT:WRITING")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close()
    ckpt = Path(checkpoint_dir(str(run)))
    assert (ckpt / (step_tag(4) + ".partial")).is_dir() and not (ckpt / step_tag(4)).exists()
    assert (ckpt / "latest").read_text() == step_tag(2)

    resumed = run_train(run, data_dir, ds, *STEPS)
    assert f"resumed from {ckpt / step_tag(2)}" in resumed.stderr
    assert same_weights(run, uninterrupted[0])


@pytest.fixture(scope="module")
def sigterm_run(data_dir, ds, tmp_path_factory) -> dict:
    """A run held inside step 3; meanwhile a second run starts on its folder; then SIGTERM, and a
    third run resumes the folder. What each of them did, and the run folder."""
    def build(folder: Path) -> None:
        run, hold = folder / "run", folder / "hold"
        hold.touch()
        first = launch(run, data_dir, ds, *STEPS, hold_at="2", hold_file=str(hold))  # micro-step 2: step 3
        out = read_until(first, "FAULT:HOLDING")
        second = run_train(run, data_dir, ds, *STEPS, expect_rc=None)
        first_alive = first.poll() is None
        first.send_signal(signal.SIGTERM)
        hold.unlink()
        try:
            out += first.communicate(timeout=150)[0]
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail(f"the first run did not stop:\n{(out + first.communicate()[0])[-3000:]}")
        rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        latest = (Path(checkpoint_dir(str(run))) / "latest").read_text()
        resumed = run_train(run, data_dir, ds, *STEPS, expect_rc=None)
        (folder / "result.json").write_text(json.dumps({
            "first_pid": first.pid, "first_rc": first.returncode, "first_out": out, "first_alive": first_alive,
            "second_rc": second.returncode, "second_stderr": second.stderr, "rows": rows, "latest": latest,
            "resumed_rc": resumed.returncode, "resumed_stderr": resumed.stderr}))

    folder = shared_dir(tmp_path_factory, "reliability_sigterm", build)
    return {**json.loads((folder / "result.json").read_text()), "run": folder / "run"}


@pytest.mark.e2e
def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(sigterm_run, uninterrupted):
    out = sigterm_run["first_out"]
    assert sigterm_run["first_rc"] == 0, out[-3000:]
    stopped_at = max(sigterm_run["rows"])
    assert stopped_at < 6 and f"stopped by SIGTERM at step {stopped_at}; checkpoint written" in out, out[-3000:]
    assert sigterm_run["latest"] == step_tag(stopped_at)

    assert sigterm_run["resumed_rc"] == 0, sigterm_run["resumed_stderr"][-3000:]
    assert same_weights(sigterm_run["run"], uninterrupted[0])


@pytest.mark.e2e
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(sigterm_run):
    second_stderr = sigterm_run["second_stderr"]
    assert sigterm_run["first_alive"], "the first run ended before the second started: nothing was tested"
    assert sigterm_run["second_rc"] == 2, second_stderr[-3000:]
    refusals = [line for line in second_stderr.splitlines() if "in use by another run" in line]
    assert len(refusals) == 1 and f"pid {sigterm_run['first_pid']}" in refusals[0] and "Traceback" not in second_stderr
    assert sigterm_run["first_rc"] == 0 and "checkpoint written" in sigterm_run["first_out"]
    steps = sigterm_run["rows"]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, once each
    # The lock went with its owner: a later run takes the folder without asking.
    assert sigterm_run["resumed_rc"] == 0, sigterm_run["resumed_stderr"][-3000:]


@pytest.mark.e2e
def test_a_nan_target_skips_that_step_and_training_goes_on(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, data_dir, ds, "--max_steps", "5", expect_rc=None, nan_at="2")  # micro-step 2 = step 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {json.loads(line)["step"]: json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in rows)
    assert "step 3: 1 step(s) skipped for a non-finite loss" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_consecutive_nans_stop_the_run_with_the_last_good_checkpoint_intact(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, data_dir, ds, "--max_steps", "20", "--ckpt_every", "2", "--max_nonfinite_steps", "3",
                     expect_rc=None, nan_at=",".join(map(str, range(2, 40))))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "the loss was not finite for 3 steps in a row (up to step 5): stopping" in out
    # Skipped steps change nothing: the checkpoint written during the streak equals the last good one.
    good = consolidated_fp32_state_dict(str(run), step_tag(2), {})
    during = consolidated_fp32_state_dict(str(run), step_tag(4), {})
    assert all(torch.equal(good[k], during[k]) for k in good)


def test_skip_step_if_leaves_weights_and_adam_state_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["step"].clone())
    p.grad = torch.full((3,), float("nan"))
    skip_step_if(opt, torch.tensor(1.0))
    opt.step()
    assert torch.equal(p, before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    assert torch.equal(opt.state[p]["step"], before[2])
    skip_step_if(opt, torch.tensor(0.0))
    p.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(p, before[0])


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replace_file_keeping_manifest_valid(ckpt_path: Path, name: str, payload) -> None:
    torch.save(payload, ckpt_path / name)
    manifest = json.loads((ckpt_path / "manifest.json").read_text())
    manifest[name] = (ckpt_path / name).stat().st_size
    (ckpt_path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.e2e
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(data_dir, ds, run_copy, tmp_path):
    run = run_copy
    marker = tmp_path / "code_ran"
    tag_dir = Path(checkpoint_dir(str(run))) / step_tag(6)
    _replace_file_keeping_manifest_valid(tag_dir, "mp_rank_00_model_states.pt", {"module": RunsCode(marker)})
    config_before = (run / "config.yaml").read_bytes()

    proc = run_train(run, data_dir, ds, "--max_steps", "8", "--ckpt_every", "2", expect_rc=2)
    assert "holds pickled objects outside the safe set (posix.system); not loading it" in proc.stderr
    assert not marker.exists() and (run / "config.yaml").read_bytes() == config_before
    assert not (Path(checkpoint_dir(str(run))) / step_tag(8)).exists()


EMPTY_STEPS = (50, 60, 70)  # newer than every real checkpoint: the README's "empty checkpoint folder" fault


@pytest.fixture(scope="module")
def damaged_resume(uninterrupted, data_dir, ds, tmp_path_factory) -> tuple[Path, str, str]:
    """A copy of the uninterrupted run with its optimizer file of step 6 truncated, that of step 4
    corrupted at the same size, and three empty step folders newer than both; resumed with
    keep_last 1. The run folder, the truncated file's name and the resuming run's stderr."""
    def build(folder: Path) -> None:
        run = folder / "run"
        shutil.copytree(uninterrupted[0], run)
        ckpt = Path(checkpoint_dir(str(run)))
        truncated = next((ckpt / step_tag(6)).glob("*optim_states.pt"))
        truncated.write_bytes(truncated.read_bytes()[:1000])
        flipped = next((ckpt / step_tag(4)).glob("*optim_states.pt"))
        data = bytearray(flipped.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])  # same size, other bytes
        flipped.write_bytes(bytes(data))
        for step in EMPTY_STEPS:
            (ckpt / step_tag(step)).mkdir()
        (folder / "truncated.txt").write_text(truncated.name)
        (folder / "stderr.txt").write_text(run_train(run, data_dir, ds, *STEPS, "--keep_last", "1").stderr)

    folder = shared_dir(tmp_path_factory, "reliability_damaged_resume", build)
    return folder / "run", (folder / "truncated.txt").read_text(), (folder / "stderr.txt").read_text()


@pytest.mark.e2e
def test_truncated_checkpoint_file_is_skipped_and_kept(damaged_resume):
    run, optim_name, stderr = damaged_resume
    ckpt = Path(checkpoint_dir(str(run)))
    assert f"skipping checkpoint {ckpt / step_tag(6)}: file {optim_name} has 1000 bytes" in stderr
    damaged = list(ckpt.glob(step_tag(6) + ".damaged-*"))
    assert len(damaged) == 1 and (damaged[0] / optim_name).stat().st_size == 1000  # kept, not overwritten
    assert (ckpt / "latest").read_text() == step_tag(6)


@pytest.mark.e2e
def test_same_size_corruption_of_the_optimizer_file_falls_back_to_the_previous_checkpoint(damaged_resume):
    run, _, stderr = damaged_resume
    ckpt = Path(checkpoint_dir(str(run)))
    assert f"skipping checkpoint {ckpt / step_tag(4)}" in stderr, stderr[-3000:]
    assert f"resumed from {ckpt / step_tag(2)}" in stderr


@pytest.mark.e2e
def test_empty_checkpoint_step_folders_are_skipped(damaged_resume, uninterrupted):
    run, _, stderr = damaged_resume
    ckpt = Path(checkpoint_dir(str(run)))
    for step in EMPTY_STEPS:
        assert f"skipping checkpoint {ckpt / step_tag(step)}: incomplete: no manifest.json" in stderr
    assert "resumed from" in stderr and losses(run).keys() >= {3, 4, 5, 6}
    assert same_weights(run, uninterrupted[0])  # the steps after the resume point were trained again


@pytest.mark.e2e
def test_keep_last_1_with_newer_empty_step_folders_keeps_the_newest_complete_checkpoint(damaged_resume):
    run, _, _ = damaged_resume
    ckpt = Path(checkpoint_dir(str(run)))
    assert loadable(ckpt / step_tag(6))
    assert not (ckpt / step_tag(2)).exists() and not (ckpt / step_tag(4)).exists()  # pruned: 1 complete kept
    assert all((ckpt / step_tag(s)).is_dir() for s in EMPTY_STEPS)  # damaged ones: left, not counted
    assert (run / "encoder.safetensors").is_file()


@pytest.mark.e2e
def test_checkpoint_of_another_model_size_stops_with_one_line_and_writes_nothing(data_dir, ds, run_copy):
    run = run_copy
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_train(run, data_dir, ds, "--max_steps", "8", "--model", "vit_small", expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if "written for another model" in line]
    assert len(errors) == 1 and "model=vit_tiny (this run: vit_small)" in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
