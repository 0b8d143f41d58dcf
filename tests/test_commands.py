"""Every command as a user meets it: `--help` exits 0 and touches nothing, the console scripts of
setup.py are installed and point at the modules' `main`, and `import img2vec` is a cheap, lazy API.

The per-command checks call each module's `main(argv)` in this process; one e2e test runs every
command's `--help` in a fresh interpreter (import-time side effects, the `__main__` blocks) and
one runs an installed console script."""
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_helpers import exit_code
from train_helpers import REPO

# (how it is started, what the usage line must name). train and finetune are DeepSpeed scripts:
# started by their path, as the launcher does; finetune also as a module.
COMMANDS = [
    ([str(REPO / "img2vec" / "train.py")], "--ds_config"),
    ([str(REPO / "img2vec" / "finetune.py")], "--ds_config"),
    (["-m", "img2vec.finetune"], "--ds_config"),
    (["-m", "img2vec.export"], "--encoder"),
    (["-m", "img2vec.visualize"], "--image_paths"),
    (["-m", "img2vec.eval.knn"], "--encoder"),
    (["-m", "img2vec.eval.linear_probe"], "--encoder"),
    (["-m", "img2vec.diversity"], "--teacher"),
    (["-m", "img2vec.memory"], "--model"),
    (["-m", "dataloading.verify"], "usage"),
    (["-m", "dataloading.sources"], "usage"),
    (["-m", "dataloading.digits"], "usage"),
]
IDS = [c[0][-1].rsplit("/", 1)[-1] for c in COMMANDS]


def module_of(command: list[str]) -> str:
    """The module a command line starts: `-m M` -> M, REPO/img2vec/train.py -> img2vec.train."""
    return command[1] if command[0] == "-m" else \
        ".".join(os.path.relpath(command[0], REPO).removesuffix(".py").split(os.sep))


def _files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), folder)
                  for d, dirs, files in os.walk(folder) for name in dirs + files)


@pytest.fixture
def restore_process_state():
    """Put back what a command's main may change in this process: the root logger, the
    environment, torch's thread count."""
    import torch

    root = logging.getLogger()
    handlers, level, env, threads = list(root.handlers), root.level, dict(os.environ), torch.get_num_threads()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command, names", COMMANDS, ids=IDS)
def test_help_exits_0_and_creates_nothing(command, names, tmp_path, monkeypatch, capsys, restore_process_state):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("IMG2VEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    code = exit_code(importlib.import_module(module_of(command)).main, ["--help"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert out.startswith("usage:") and names in out, out[:500]
    assert "Traceback" not in err, err[-3000:]
    assert _files_under(cwd) == [], "--help wrote files in the working directory"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ext").exists(), "--help filled a cache"


# Runs in a fresh interpreter: each command started as its command line starts it (runpy runs the
# file or module as __main__ with that argv), output captured per command; one JSON line each.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
for command in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if command[0] == "-m":
                sys.argv = [command[1], "--help"]
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [command[0], "--help"]
                runpy.run_path(command[0], run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
    print(json.dumps({"code": 0 if code is None else code, "out": out.getvalue(), "err": err.getvalue()}),
          flush=True)
"""


@pytest.mark.e2e
def test_help_in_a_fresh_interpreter_exits_0_and_creates_nothing(tmp_path):
    """Every command's `--help` from a cold start: importing the command's modules writes nothing."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "IMG2VEC_CACHE": str(tmp_path / "cache"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps([c for c, _ in COMMANDS])], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"code"')]
    assert len(results) == len(COMMANDS), proc.stdout[-3000:]
    for (command, names), result in zip(COMMANDS, results):
        assert result["code"] == 0, (command, result["err"][-3000:])
        assert result["out"].startswith("usage:") and names in result["out"], (command, result["out"][:500])
        assert "Traceback" not in result["err"], (command, result["err"][-3000:])
    assert _files_under(cwd) == [], "--help wrote files in the working directory"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ext").exists(), "--help filled a cache"


EXIT_DRIVER = """
import atexit, gc, sys
from img2vec.runtime import exit_process
class Cycle:
    def __init__(self):
        self.me = self
    def __del__(self):
        print("collected", flush=True)
atexit.register(lambda: print("atexit ran, frozen", gc.get_freeze_count() > 0, flush=True))
print("buffered", end="")  # not flushed by hand: the normal exit flushes stdout
Cycle()
exit_process(int(sys.argv[1]))
"""


def test_exit_process_keeps_the_code_atexit_and_buffers_and_skips_collecting_cycles():
    """The entry points' fast exit: the code and the output arrive and atexit handlers (the run lock)
    run; an object in a reference cycle is left to the OS instead of being collected (that skipped
    collection is the time saved)."""
    proc = subprocess.run([sys.executable, "-c", EXIT_DRIVER, "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.startswith("buffered") and "atexit ran, frozen True" in proc.stdout, proc.stdout
    assert "collected" not in proc.stdout


def test_end_start_up_freezes_and_turns_the_collector_back_on_only_after_an_entry_point_turned_it_off():
    import gc

    from img2vec.runtime import end_start_up

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    end_start_up()  # main() called in process (a test): nothing to do
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()  # what train.py's and finetune.py's __main__ do before their imports
    try:
        end_start_up()
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.parametrize("module", ["img2vec.export", "img2vec.visualize", "img2vec.eval.knn",
                                    "img2vec.eval.linear_probe", "img2vec.finetune"])
def test_every_checkpoint_reader_takes_trust_checkpoint(module, capsys, restore_process_state):
    """The refusal of a code-running pickle names --trust_checkpoint: every reader must have it."""
    assert exit_code(importlib.import_module(module).main, ["--help"]) == 0
    assert "--trust_checkpoint" in capsys.readouterr().out


def _scripts_in_setup() -> dict[str, str]:
    """name -> "module:main" of every console script setup.py declares."""
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(img2vec-[a-z-]+) = ([\w.]+:main)"', text))


def test_setup_declares_a_console_script_per_command():
    declared = _scripts_in_setup()
    for name in ("img2vec-train", "img2vec-finetune", "img2vec-knn", "img2vec-linear-probe", "img2vec-export",
                 "img2vec-visualize", "img2vec-diversity", "img2vec-memory", "img2vec-verify"):
        assert name in declared, f"setup.py declares no {name}"
    for name, target in declared.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        assert callable(main), target


def test_installed_console_scripts_match_setup_py():
    # A stale install (pip install -e . not rerun after setup.py changed) fails here, not in a user's shell.
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("img2vec-")}
    assert installed == _scripts_in_setup(), "rerun: pip install -e ."


@pytest.mark.e2e
def test_a_console_script_runs(tmp_path):
    script = shutil.which("img2vec-knn")
    assert script, "img2vec-knn is not on PATH: pip install -e ."
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: img2vec-knn"), proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_import_img2vec_is_cheap_and_its_api_resolves():
    # A fresh interpreter: only there does sys.modules show what `import img2vec` alone imports.
    code = "import sys, img2vec; assert 'torch' not in sys.modules, 'import img2vec imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import img2vec
    import img2vec.config
    import img2vec.eval.common
    import img2vec.teacher
    import img2vec.vit
    from img2vec import Config, FinetuneConfig, Teacher, build_student, load_encoder, masked_feature_loss  # noqa: F401

    assert Config is img2vec.config.Config and build_student is img2vec.vit.build_student
    assert Teacher is img2vec.teacher.Teacher and load_encoder is img2vec.eval.common.load_encoder
    assert FinetuneConfig is img2vec.config.FinetuneConfig and callable(masked_feature_loss)
    assert all(getattr(img2vec, name) is not None for name in img2vec.__all__)
    with pytest.raises(AttributeError):
        importlib.import_module("img2vec").no_such_name


def test_the_api_loss_is_the_reference_on_cpu():
    import torch

    import img2vec
    from kernels.reference import masked_feature_loss_ref

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    ids_masked = torch.tensor([[0, 3, 6], [1, 2, 5]])
    torch.testing.assert_close(img2vec.masked_feature_loss(pred, target, ids_masked, 2.0, 1e-6),
                               masked_feature_loss_ref(pred, target, ids_masked, 2.0, 1e-6))
    student = img2vec.build_student("vit_tiny", 32, 8, 5, 1, 32, 2)
    assert student.encoder.num_patches == 16


def test_every_module_with_a_main_block_is_in_the_help_test():
    # A new command joins COMMANDS (and so the --help tests) or this fails.
    tested = {module_of(c) for c, _ in COMMANDS}
    commands = {".".join(path.relative_to(REPO).with_suffix("").parts)
                for package in ("img2vec", "dataloading", "kernels") for path in (REPO / package).rglob("*.py")
                if 'if __name__ == "__main__":' in path.read_text()}
    assert commands and commands <= tested, sorted(commands - tested)
