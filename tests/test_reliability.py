"""Fault injection in real processes: kills, signals, NaNs, hostile and broken checkpoints.

Each fault is checked against what an uninterrupted run with the same seed produces.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, checkpoint_dir, losses, step_tag, train, train_args, write_ds_config

from img2vec.checkpoint import consolidated_fp32_state_dict
from img2vec.optim import skip_step_if

INJECT = REPO / "tests" / "fault_injection.py"
STEPS = ["--max_steps", "6", "--ckpt_every", "2"]


def launch(run: Path, data_dir: Path, ds: Path, *extra: str, **faults: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29000 + os.getpid() % 500 + len(faults)),
           **{f"FAULT_{k.upper()}": v for k, v in faults.items()}}
    return subprocess.Popen([sys.executable, str(INJECT), *train_args(run, data_dir, ds, *extra)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "encoder.safetensors")), load_file(str(b / "encoder.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_ds_config(tmp_path_factory.mktemp("ds") / "ds.json", 2, 8)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, ds, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, data_dir, ds, *STEPS)
    return run


def test_sigkill_while_writing_a_checkpoint_loses_only_the_steps_since_the_last_one(data_dir, ds, uninterrupted,
                                                                                    tmp_path):
    run = tmp_path / "run"
    proc = launch(run, data_dir, ds, *STEPS, slow_save="2")  # the 2nd checkpoint: step 4
    for line in proc.stdout:
        if "FAULT:WRITING" in line:  # tqdm may precede it on the same line (\r, no newline)
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    ckpt = Path(checkpoint_dir(str(run)))
    assert (ckpt / (step_tag(4) + ".partial")).is_dir() and not (ckpt / step_tag(4)).exists()
    assert (ckpt / "latest").read_text() == step_tag(2)

    resumed = train(run, data_dir, ds, *STEPS)
    assert f"resumed from {ckpt / step_tag(2)}" in resumed.stderr
    assert same_weights(run, uninterrupted)


def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(data_dir, ds, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, data_dir, ds, *STEPS, step_delay="0.5")
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "training never logged a step"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = max(losses(run))
    assert stopped_at < 6 and f"stopped by SIGTERM at step {stopped_at}; checkpoint written" in out
    assert (Path(checkpoint_dir(str(run))) / "latest").read_text() == step_tag(stopped_at)

    train(run, data_dir, ds, *STEPS)
    assert same_weights(run, uninterrupted)


def test_a_nan_target_skips_that_step_and_training_goes_on(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, data_dir, ds, "--max_steps", "5", nan_at="2")  # micro-step 2 = step 3
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    rows = {json.loads(line)["step"]: json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in rows)
    assert "step 3: 1 step(s) skipped for a non-finite loss" in out


def test_consecutive_nans_stop_the_run_with_the_last_good_checkpoint_intact(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, data_dir, ds, "--max_steps", "20", "--ckpt_every", "2", "--max_nonfinite_steps", "3",
                  nan_at=",".join(map(str, range(2, 40))))
    out, _ = proc.communicate(timeout=300)
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


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, ds, "--max_steps", "2")
    marker = tmp_path / "code_ran"
    tag_dir = Path(checkpoint_dir(str(run))) / step_tag(2)
    _replace_file_keeping_manifest_valid(tag_dir, "mp_rank_00_model_states.pt", {"module": RunsCode(marker)})
    config_before = (run / "config.yaml").read_bytes()

    proc = train(run, data_dir, ds, "--max_steps", "4", expect_rc=2)
    assert "holds pickled objects outside the safe set (posix.system); not loading it" in proc.stderr
    assert not marker.exists() and (run / "config.yaml").read_bytes() == config_before
    assert not (Path(checkpoint_dir(str(run))) / step_tag(4)).exists()


def test_truncated_checkpoint_file_is_skipped_and_kept(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, ds, "--max_steps", "4", "--ckpt_every", "2")
    ckpt = Path(checkpoint_dir(str(run)))
    optim = next((ckpt / step_tag(4)).glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])

    proc = train(run, data_dir, ds, "--max_steps", "4", "--ckpt_every", "2")
    assert f"skipping checkpoint {ckpt / step_tag(4)}: file {optim.name} has 1000 bytes" in proc.stderr
    assert f"resumed from {ckpt / step_tag(2)}" in proc.stderr
    damaged = list(ckpt.glob(step_tag(4) + ".damaged-*"))
    assert len(damaged) == 1 and (damaged[0] / optim.name).stat().st_size == 1000  # kept, not overwritten
    assert (ckpt / "latest").read_text() == step_tag(4)


def test_empty_checkpoint_directories(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    Path(checkpoint_dir(str(run))).mkdir(parents=True)
    proc = train(run, data_dir, ds, "--max_steps", "2")
    assert "no complete checkpoint in" in proc.stderr and "starting from step 0" in proc.stderr

    empty_step = Path(checkpoint_dir(str(run))) / step_tag(4)
    empty_step.mkdir()
    proc = train(run, data_dir, ds, "--max_steps", "3")
    assert f"skipping checkpoint {empty_step}: incomplete: no manifest.json" in proc.stderr
    assert "resumed from" in proc.stderr and losses(run).keys() >= {3}


def test_checkpoint_of_another_model_size_stops_with_one_line_and_writes_nothing(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, ds, "--max_steps", "2")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = train(run, data_dir, ds, "--max_steps", "4", "--model", "vit_small", expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if "written for another model" in line]
    assert len(errors) == 1 and "model=vit_tiny (this run: vit_small)" in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
