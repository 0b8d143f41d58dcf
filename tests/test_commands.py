"""Every command as a user meets it: `--help` exits 0 and touches nothing, the console scripts of
setup.py are installed and point at the modules' `main`, and `import img2vec` is a cheap, lazy API."""
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
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


def _files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), folder)
                  for d, dirs, files in os.walk(folder) for name in dirs + files)


@pytest.mark.parametrize("command, names", COMMANDS, ids=[c[0][-1].rsplit("/", 1)[-1] for c in COMMANDS])
def test_help_exits_0_and_creates_nothing(command, names, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "IMG2VEC_CACHE": str(tmp_path / "cache"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:") and names in proc.stdout, proc.stdout[:500]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _files_under(cwd) == [], "--help wrote files in the working directory"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ext").exists(), "--help filled a cache"


@pytest.mark.parametrize("module", ["img2vec.export", "img2vec.visualize", "img2vec.eval.knn",
                                    "img2vec.eval.linear_probe", "img2vec.finetune"])
def test_every_checkpoint_reader_takes_trust_checkpoint(module):
    """The refusal of a code-running pickle names --trust_checkpoint: every reader must have it."""
    parser_help = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                                 timeout=300).stdout
    assert "--trust_checkpoint" in parser_help


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


def test_a_console_script_runs(tmp_path):
    import shutil

    script = shutil.which("img2vec-knn")
    assert script, "img2vec-knn is not on PATH: pip install -e ."
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: img2vec-knn"), proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_import_img2vec_is_cheap_and_its_api_resolves():
    code = ("import sys, img2vec; assert 'torch' not in sys.modules, 'import img2vec imported torch'; "
            "from img2vec import Config, FinetuneConfig, build_student, Teacher, masked_feature_loss, load_encoder; "
            "import img2vec.config, img2vec.vit, img2vec.teacher, img2vec.eval.common; "
            "assert Config is img2vec.config.Config and build_student is img2vec.vit.build_student; "
            "assert Teacher is img2vec.teacher.Teacher and load_encoder is img2vec.eval.common.load_encoder; "
            "print(sorted(img2vec.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    # A new command joins COMMANDS (and so the --help test) or this fails.
    tested = {c[-1].replace(str(REPO) + "/", "").removesuffix(".py").replace("/", ".") for c, _ in COMMANDS}
    commands = {".".join(path.relative_to(REPO).with_suffix("").parts)
                for package in ("img2vec", "dataloading", "kernels") for path in (REPO / package).rglob("*.py")
                if 'if __name__ == "__main__":' in path.read_text()}
    assert commands and commands <= tested, sorted(commands - tested)
