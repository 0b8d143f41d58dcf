"""Hostile users and flaky clusters, in real processes: code-running pickles on every path that
reads a checkpoint, signals under the real launchers, non-finite weights at save, broken
DeepSpeed JSON, a full disk, changed settings at resume, and byte-reproducible exports.
(Damaged folders with keep_last, same-size corruption and two runs on one output_dir are in
test_reliability.py, which damages copies of one training run.)

The commands that only read a checkpoint (export, knn, visualize) run in this process through
their main(argv); train.py and the launchers run in real processes.

TRAIN_PY (environment) names another copy of train.py to drive; the default is the repo's.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from cli_helpers import run_main
from train_helpers import (INJECT, REPO, checkpoint_dir, fault_env, free_port, run_train, shared_dir,
                           step_tag, train_args, write_ds_config)

STEPS = ["--max_steps", "6", "--ckpt_every", "2"]
DEEPSPEED = shutil.which("deepspeed")
TORCHRUN = shutil.which("torchrun")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=fault_env(), capture_output=True, text=True,
                          timeout=300)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(ckpt_path: Path, name: str, payload) -> None:
    """Replace one checkpoint file and rewrite the manifest to match, as an attacker with write
    access could (sizes and, if the manifest has them, sha256s)."""
    import hashlib

    torch.save(payload, ckpt_path / name)
    manifest_path = ckpt_path / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest[name] = (ckpt_path / name).stat().st_size
        if "_sha256" in manifest:
            manifest["_sha256"][name] = hashlib.sha256((ckpt_path / name).read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


def loadable(tag_dir: Path) -> bool:
    from img2vec.checkpoint import check_complete

    return tag_dir.is_dir() and check_complete(str(tag_dir)) is None


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_ds_config(tmp_path_factory.mktemp("ds") / "ds.json", 2, 8)


@pytest.fixture(scope="module")
def two_step_run(data_dir, ds, tmp_path_factory):
    """A finished 2-step run (checkpoint step 2, encoder export), trained once per session; tests
    copy it or only read it."""
    return shared_dir(tmp_path_factory, "hostile_two_step_run",
                      lambda folder: run_train(folder / "run", data_dir, ds, "--max_steps", "2")) / "run"


@pytest.fixture
def run_copy(two_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    return run


# --- 1. No pickled code runs from any checkpoint ---------------------------------------------------


@pytest.mark.e2e
def test_a_crafted_state_step_cannot_point_the_end_of_run_export_at_a_hostile_folder(data_dir, ds, run_copy,
                                                                                     tmp_path):
    ckpt, marker = Path(checkpoint_dir(str(run_copy))), tmp_path / "code_ran"
    state_path = ckpt / step_tag(2) / "img2vec_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "step": 99}))
    manifest = json.loads((ckpt / step_tag(2) / "manifest.json").read_text())
    manifest = {name: size for name, size in manifest.items() if not name.startswith("_")}  # sizes only
    manifest["img2vec_state.json"] = state_path.stat().st_size
    (ckpt / step_tag(2) / "manifest.json").write_text(json.dumps(manifest))
    hostile = ckpt / step_tag(99)  # no manifest: never verified, never to be read
    shutil.copytree(ckpt / step_tag(2), hostile)
    (hostile / "manifest.json").unlink()
    torch.save({"module": RunsCode(marker)}, hostile / "mp_rank_00_model_states.pt")

    proc = run_train(run_copy, data_dir, ds, "--max_steps", "3", expect_rc=None)
    assert not marker.exists(), "a pickle from an unverified folder ran"
    assert f"skipping checkpoint {ckpt / step_tag(2)}: its state says step 99" in proc.stderr
    assert proc.returncode == 0 and loadable(ckpt / step_tag(3))


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["export", "knn", "visualize"])
def test_every_reading_command_refuses_a_code_running_pickle_in_one_line(command, run_copy, data_dir, tmp_path,
                                                                         capfd):
    marker = tmp_path / "code_ran"
    plant(Path(checkpoint_dir(str(run_copy))) / step_tag(2), "mp_rank_00_model_states.pt",
          {"module": RunsCode(marker)})
    (run_copy / "encoder.safetensors").unlink()  # so the readers must open the checkpoint
    image = str(next(Path(data_dir).rglob("*.jpg")))
    args = {"export": ["img2vec.export", "--encoder", str(run_copy), "--output_dir", str(tmp_path / "out")],
            "knn": ["img2vec.eval.knn", "--encoder", str(run_copy), "--data_path", str(tmp_path / "nodata")],
            "visualize": ["img2vec.visualize", "--encoder", str(run_copy), "--image_paths", image, "--output_dir",
                          str(tmp_path / "v")]}
    rc, _, stderr = run_main(capfd, *args[command])
    assert not marker.exists(), f"{command} ran the pickle"
    errors = [line for line in stderr.splitlines() if "outside the safe set" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.e2e
def test_latest_pointing_out_of_the_run_folder_is_not_followed(run_copy, tmp_path, capfd):
    marker, elsewhere = tmp_path / "code_ran", tmp_path / "elsewhere" / "checkpoints" / "evil"
    shutil.copytree(Path(checkpoint_dir(str(run_copy))) / step_tag(2), elsewhere)
    (elsewhere / "manifest.json").unlink()
    torch.save({"module": RunsCode(marker)}, elsewhere / "mp_rank_00_model_states.pt")
    victim = tmp_path / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    shutil.copy(run_copy / "config.yaml", victim / "config.yaml")
    (victim / "checkpoints" / "latest").write_text(os.path.relpath(elsewhere, victim / "checkpoints"))

    rc, _, stderr = run_main(capfd, "img2vec.export", "--encoder", str(victim), "--output_dir", str(tmp_path / "out"))
    assert not marker.exists(), "latest was followed out of the run folder"
    assert rc == 2 and "no DeepSpeed checkpoint" in stderr, stderr[-3000:]


# --- 2. Signals under the real launchers --------------------------------------------------------------


def launch(cmd: list[str], run: Path, data_dir: Path, ds: Path, *extra: str, step_delay: str = "0.5",
           **faults) -> subprocess.Popen:
    """Start a launcher command line in its own session (so a test can signal its process group)."""
    return subprocess.Popen([*cmd, str(INJECT), *train_args(run, data_dir, ds, *STEPS, *extra)], cwd=REPO,
                            env=fault_env(step_delay=step_delay, **faults), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_first_step(proc: subprocess.Popen, run: Path) -> None:
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "training never logged a step"
        time.sleep(0.1)


def drain(proc: subprocess.Popen, timeout: float = 150) -> str:
    """Everything the launcher and its workers print, until the last of them closes the pipe."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the workers did not stop:\n{out[-3000:]}")
    return out


LAUNCHERS = {
    "deepspeed": lambda: [sys.executable, DEEPSPEED, "--num_gpus", "1", "--master_port", str(free_port())],
    "torchrun": lambda: [sys.executable, TORCHRUN, "--nproc_per_node", "1", "--master_port", str(free_port())],
    "python": lambda: [sys.executable],
}


@pytest.mark.e2e
@pytest.mark.parametrize("launcher,how", [
    ("deepspeed", "SIGTERM to the launcher"),  # the launcher dies; the orphaned worker must notice
    ("deepspeed", "Ctrl-C"),  # SIGINT to the group, then launch.py's SIGTERM: one request, not two
    ("torchrun", "SIGTERM to the launcher"),
    ("torchrun", "Ctrl-C"),
    ("python", "Ctrl-C"),
])
def test_preemption_and_ctrl_c_checkpoint_and_exit_0_under_each_launcher(launcher, how, data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = launch(LAUNCHERS[launcher](), run, data_dir, ds)
    wait_for_first_step(proc, run)
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    else:
        proc.send_signal(signal.SIGTERM)
    out = drain(proc)
    assert "checkpoint written. Rerun the same command to resume" in out, out[-4000:]
    assert "exiting now, without a checkpoint" not in out
    stopped_at = int(out.split("checkpoint written")[0].rsplit(" at step ", 1)[1].split(";")[0])
    assert stopped_at < 6 and (Path(checkpoint_dir(str(run))) / "latest").read_text() == step_tag(stopped_at)
    assert loadable(Path(checkpoint_dir(str(run))) / step_tag(stopped_at))
    if launcher == "python":
        assert proc.returncode == 0
    if launcher == "deepspeed" and how != "Ctrl-C":
        assert "exits successfully" in out  # launch.py saw the worker exit 0


@pytest.mark.e2e
def test_a_second_ctrl_c_exits_at_once(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = launch(LAUNCHERS["python"](), run, data_dir, ds, slow_save="1")  # the first checkpoint hangs
    for line in proc.stdout:
        if "FAULT:WRITING" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # stop after this checkpoint ...
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGINT)  # ... no: now
    out = drain(proc, 60)
    assert proc.returncode == 128 + signal.SIGINT and "SIGINT again: exiting now" in out, out[-3000:]


# --- 3. Non-finite weights are never committed -----------------------------------------------------------


@pytest.mark.e2e
def test_a_checkpoint_never_holds_non_finite_weights(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, data_dir, ds, "--max_steps", "10", "--ckpt_every", "2", "--max_nonfinite_steps", "3",
                     expect_rc=None, nan_weights_at="3")
    ckpt = Path(checkpoint_dir(str(run)))
    assert proc.returncode == 3, proc.stderr[-3000:]
    refused = [line for line in proc.stderr.splitlines() if "weights are not finite" in line]
    assert refused and "checkpoint not written" in refused[0]
    assert (ckpt / "latest").read_text() == step_tag(2) and not (ckpt / step_tag(4)).exists()
    from img2vec.checkpoint import load_fp32_state_dict

    assert all(torch.isfinite(v).all() for v in load_fp32_state_dict(str(ckpt / step_tag(2)), {}).values())


# --- 4. One line, not a traceback: DeepSpeed JSON, full disk -----------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("content,expected,where", [
    ("[1, 2]", "must hold a JSON object", "in-process"),
    ('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 7}}', "stage must be one of 1, 2, 3",
     "subprocess"),
    # refused by DeepSpeed itself, after the model is built: its reason, in one line
    ('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2, "stagee": 1}}',
     "DeepSpeed rejected the DeepSpeed JSON (DeepSpeedZeroConfig): stagee: Extra inputs are not permitted",
     "subprocess"),
], ids=["list", "zero_stage_7", "key_deepspeed_rejects"])
def test_a_broken_deepspeed_json_is_one_line_and_exit_2(content, expected, where, data_dir, tmp_path, capfd):
    """Refused before anything slow: train.py's main in this process, and once as a real process."""
    bad = tmp_path / "ds.json"
    bad.write_text(content)
    if where == "subprocess":
        proc = run_train(tmp_path / "run", data_dir, bad, expect_rc=2)
        rc, stderr = proc.returncode, proc.stderr
    else:
        rc, _, stderr = run_main(capfd, "img2vec.train", *train_args(tmp_path / "run", data_dir, bad))
    assert rc == 2 and expected in stderr and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if expected in line]
    assert len(lines) == 1


@pytest.mark.e2e
def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(data_dir, ds, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, data_dir, ds, *STEPS, expect_rc=None, enospc_at="2")  # the checkpoint of step 4
    ckpt = Path(checkpoint_dir(str(run)))
    lines = [line for line in proc.stderr.splitlines() if "no space left on" in line]
    assert proc.returncode == 2 and len(lines) == 1 and "MB needed" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert loadable(ckpt / step_tag(2)) and not (ckpt / (step_tag(4) + ".partial")).exists()


# --- 5. Resume refuses changed settings; exports are byte-reproducible ------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("stage,micro,expected", [(2, 4, "micro-batch 8 -> 4"), (1, 8, "ZeRO stage 2 -> 1")],
                         ids=["micro_batch", "zero_stage"])
def test_resume_with_another_micro_batch_or_zero_stage_is_refused_and_changes_nothing(
        stage, micro, expected, run_copy, data_dir, tmp_path):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    other = write_ds_config(tmp_path / "other.json", stage, micro)
    proc = run_train(run_copy, data_dir, other, "--max_steps", "4", expect_rc=2)
    lines = [line for line in proc.stderr.splitlines() if "was written with other settings" in line]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before


@pytest.mark.e2e
def test_the_encoder_export_is_byte_reproducible(two_step_run, tmp_path, capfd):
    # Four processes, each with its own hash seed (safetensors' own writer orders metadata by a
    # seeded hash): the training run's end-of-run export, two export commands, and this process.
    outputs = [(two_step_run / "encoder.safetensors").read_bytes()]
    for i in range(2):
        out = tmp_path / f"out{i}"
        proc = run_module("img2vec.export", "--encoder", str(two_step_run), "--output_dir", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append((out / "encoder.safetensors").read_bytes())
    rc, _, stderr = run_main(capfd, "img2vec.export", "--encoder", str(two_step_run), "--output_dir",
                             str(tmp_path / "here"))
    assert rc == 0, stderr[-3000:]
    outputs.append((tmp_path / "here" / "encoder.safetensors").read_bytes())
    assert len(outputs) == 4 and all(o == outputs[0] for o in outputs)
    weights = load_file(str(tmp_path / "out0" / "encoder.safetensors"))
    trained = load_file(str(two_step_run / "encoder.safetensors"))
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in weights)


# --- Fast checks of the pieces ------------------------------------------------------------------------


@pytest.mark.parametrize("content,expected", [
    (None, "DeepSpeed config not found"),
    ("{not json", "is not valid JSON"),
    ("[1]", "must hold a JSON object"),
    ('{"train_micro_batch_size_per_gpu": 0}', "train_micro_batch_size_per_gpu must be a whole number >= 1, got 0"),
    ('{"train_micro_batch_size_per_gpu": "4"}', "train_micro_batch_size_per_gpu must be a whole number >= 1, got '4'"),
    ('{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 0}', "gradient_accumulation_steps must"),
    ('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 7}}', "stage must be one of 1, 2, 3"),
    ('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}', "ZeRO stage 0 (also DeepSpeed's"),
    ('{"train_micro_batch_size_per_gpu": 4}', "is not supported: img2vec's checkpoints, resume and encoder export"),
    ('{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 10, "zero_optimization": {"stage": 1}}',
     "train_batch_size 10 != micro-batch 4 x gradient_accumulation_steps 1 x 1 process(es) = 4"),
    ('{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8, "gradient_accumulation_steps": 1, '
     '"zero_optimization": {"stage": 1}}', "train_batch_size 8 != micro-batch 4"),
    ('{"train_micro_batch_size_per_gpu": 4, "gradient_clipping": "x", "zero_optimization": {"stage": 1}}',
     "gradient_clipping must be a number >= 0 (0: off), got 'x'"),
    ('{"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}}', "remove 'optimizer'/'scheduler'"),
])
def test_every_deepspeed_json_problem_is_one_config_error(content, expected, tmp_path):
    from img2vec.config import ConfigError
    from img2vec.ds_config import load_ds_config

    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_ds_config(str(path), 1)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_batch_overrides_are_checked_against_the_files_train_batch_size(tmp_path):
    from img2vec.config import ConfigError
    from img2vec.ds_config import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 32, "zero_optimization": {"stage": 1}}')
    cfg = load_ds_config(str(path), 2, micro_batch=8)  # --batch_size 8: 32 = 8 x 2 processes x 2 micro-steps
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (8, 2, 32)
    with pytest.raises(ConfigError, match="train_batch_size 32 != micro-batch 8 x gradient_accumulation_steps 4 x 2"):
        load_ds_config(str(path), 2, micro_batch=8, accum_steps=4)  # never a silent 64


def test_a_train_batch_size_without_accumulation_steps_sets_them_as_deepspeed_does(tmp_path):
    from img2vec.ds_config import load_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 4, "train_batch_size": 32, "zero_optimization": {"stage": 1}}')
    cfg = load_ds_config(str(path), 2)  # 32 images per step = 4 per process x 2 processes x 4 micro-steps
    assert (cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 32)


@pytest.mark.parametrize("module,name,message", [
    ("img2vec.teacher", "TeacherWeightsError", "teacher weights w.pth do not fit the teacher: 16 shape mismatches"),
    ("img2vec.teacher", "CheckpointLayoutError", "unknown checkpoint layout in w.pth: top-level keys found: none"),
    ("img2vec.fastpaths", "FastPathError", "attn_impl=xformers cannot run here (no xformers); use attn_impl=auto"),
])
def test_bad_teacher_weights_and_fast_paths_that_cannot_run_are_one_line_and_exit_2(module, name, message, capsys):
    import importlib

    from img2vec.runtime import report_user_error

    assert report_user_error(getattr(importlib.import_module(module), name)(message)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(message)


def test_a_bug_keeps_its_traceback():
    from img2vec.runtime import report_user_error

    with pytest.raises(RuntimeError, match="a bug"):
        report_user_error(RuntimeError("a bug"))


def test_save_safetensors_is_byte_stable_and_loads_back(tmp_path):
    from img2vec.checkpoint import save_safetensors

    tensors = {"b.weight": torch.randn(3, 5), "a": torch.arange(4, dtype=torch.float32), "c": torch.zeros(0)}
    save_safetensors(tensors, str(tmp_path / "x.safetensors"), {"library": "timm", "format": "pt"})
    save_safetensors(dict(reversed(tensors.items())), str(tmp_path / "y.safetensors"), {"format": "pt", "library": "timm"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_lock_left_by_a_killed_run_is_taken_over_and_a_live_one_refuses(tmp_path):
    from img2vec.run_lock import RunLock, RunLockedError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from img2vec.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {holder.pid} on "):
        RunLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / ".lock").exists()  # SIGKILL left the file, but not the lock
    lock = RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_sigterm_after_sigint_is_the_same_request_and_a_late_second_sigint_exits():
    code = ("import os, signal, time; from img2vec.signals import GracefulStop; s = GracefulStop(); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); "
            "print('alive', s.signal_name, flush=True); time.sleep(1.2); os.kill(os.getpid(), signal.SIGINT); "
            "time.sleep(5); print('not reached')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "alive SIGINT" in proc.stdout and "not reached" not in proc.stdout
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr


def test_a_worker_notices_that_its_launcher_died(tmp_path):
    child = ("import time; from img2vec.signals import GracefulStop; s = GracefulStop(poll_s=0.1); "
             "print('ready', flush=True); deadline = time.time() + 30\n"
             "while not s.requested and time.time() < deadline: time.sleep(0.05)\n"
             "print('stop:', s.signal_name, flush=True)")
    launcher = tmp_path / "torchrun"  # a launcher by name, as the watcher recognises them
    launcher.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
                        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(launcher)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    assert proc.stdout.readline().strip() == "stop: the exit of the torchrun launcher"


def test_resume_refuses_other_teacher_weights_under_the_same_name(tmp_path):
    from img2vec.checkpoint import ARCHITECTURE_KEYS, _compatibility, teacher_fingerprint

    weights = tmp_path / "teacher.pth"
    torch.save({"w": torch.zeros(4)}, weights)
    config = {**{k: 1 for k in ARCHITECTURE_KEYS}, "teacher_weights": str(weights)}
    state = {"config": dict(config), "teacher_sha256": teacher_fingerprint(str(weights))}
    assert _compatibility("ckpt", state, None, config) is None
    time.sleep(0.01)
    torch.save({"w": torch.ones(4)}, weights)  # same path and size, other weights
    refusal = _compatibility("ckpt", state, None, config)
    assert refusal is not None and f"teacher weights file {weights} changed" in refusal
    assert "teacher weights random ->" in _compatibility("ckpt", {**state, "config": {**config, "teacher_weights": ""}},
                                                         None, config)
