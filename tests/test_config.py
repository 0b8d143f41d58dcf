"""Run config: precedence, types, and one clear line for each mistake."""
from dataclasses import fields

import pytest
import yaml

from img2vec.config import GROUPS, Config, ConfigError, FinetuneConfig, load_config, run_config


def test_defaults_are_the_embedded_smoke_run():
    cfg = load_config()
    assert cfg.model == "vit_tiny" and cfg.data_path == "" and cfg.teacher == "hog"  # no weights: HOG
    assert cfg.loss == "smooth_l1" and cfg.loss_beta == 2.0 and cfg.resolved_patch_size == 16


def test_auto_teacher_is_the_papers_with_weights_and_weight_free_without(tmp_path):
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"")
    assert load_config(None, ["--teacher_weights", "random"]).teacher == "resnet50"
    assert load_config(None, ["--teacher_weights", str(weights)]).teacher == "resnet50"
    assert load_config(None, ["--data_path", str(tmp_path), "--teacher", "hog"]).teacher == "hog"
    with pytest.raises(ConfigError, match="with your own data_path, choose the teacher: teacher_weights FILE"):
        load_config(None, ["--data_path", str(tmp_path)])  # never HOG in place of the paper's teacher unasked
    huge = load_config(None, ["--model", "vit_huge", "--patch_size", "0", "--image_size", "224"])
    assert huge.teacher == "pixels"  # patch 14: HOG's 8-pixel cells do not tile it


def test_yaml_then_flags_override_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"mask_ratio": 0.6, "epochs": 3, "model": "vit_small"}))
    cfg = load_config(str(path), ["--epochs", "5", "--resume=false", "--base-lr", "1e-3"])
    assert (cfg.mask_ratio, cfg.epochs, cfg.model, cfg.resume, cfg.base_lr) == (0.6, 5, "vit_small", False, 1e-3)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--mask_ratio", "0.5", "--image_size", "64"])
    cfg.save(str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_huge_preset_uses_patch_14():
    cfg = load_config(None, ["--model", "vit_huge", "--patch_size", "0", "--image_size", "224"])
    assert cfg.resolved_patch_size == 14


@pytest.mark.parametrize("overrides, message", [
    (["--mask_ratoi", "0.5"], r"unknown config key 'mask_ratoi' \(did you mean 'mask_ratio'\?\)"),
    (["--epochs", "ten"], r"config key 'epochs' expects int, got 'ten'"),
    (["--mask_ratio", "abc"], r"config key 'mask_ratio' expects float"),
    (["--resume", "maybe"], r"config key 'resume' expects bool"),
    (["--mask_ratio", "1.0"], r"mask_ratio must be in \(0, 1\), got 1.0"),
    (["--mask_ratio", "0"], r"mask_ratio must be in \(0, 1\)"),
    (["--image_size", "100"], r"image_size 100 is not divisible by patch_size 16"),
    (["--teacher", "resnet50", "--teacher_stage", "7"], r"teacher resnet50 has stages 0..4"),
    (["--teacher", "resnet5000"], r"unknown teacher 'resnet5000'"),
    (["--model", "vit_gigantic"], r"model must be one of"),
    (["--loss_impl", "cuda"], r"loss_impl must be one of auto, triton, reference"),
    (["--epochs"], r"--epochs needs a value"),
    (["stray"], r"unexpected argument 'stray'"),
])
def test_each_mistake_gets_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_own_data_needs_teacher_weights_said_explicitly(tmp_path):
    with pytest.raises(ConfigError, match="set teacher_weights"):
        load_config(None, ["--data_path", str(tmp_path), "--teacher", "resnet50"])
    assert load_config(None, ["--data_path", str(tmp_path), "--teacher_weights", "random"]).teacher_weights == "random"
    with pytest.raises(ConfigError, match="teacher_weights file not found"):
        load_config(None, ["--teacher_weights", str(tmp_path / "missing.pth")])
    with pytest.raises(ConfigError, match="data_path does not exist"):
        load_config(None, ["--data_path", str(tmp_path / "nope"), "--teacher_weights", "random"])
    with pytest.raises(ConfigError, match="data_path does not exist: .*train-.*tar .*a glob in quotes"):
        load_config(None, ["--data_path", str(tmp_path / "train-*.tar"), "--teacher", "hog"])


def test_a_glob_of_webdataset_shards_is_a_data_path(tmp_path):
    (tmp_path / "train-0000.tar").write_bytes(b"")  # the loader reads shards; the config checks the pattern matches
    pattern = str(tmp_path / "train-*.tar")
    assert load_config(None, ["--data_path", pattern, "--teacher", "hog"]).data_path == pattern


def test_yaml_unknown_key_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        load_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))


def test_yaml_cannot_execute_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    evil.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="could not parse"):
        load_config(str(evil))
    assert not marker.exists()


def test_dataclass_fields_all_have_defaults():
    # The embedded default constructs with no arguments and is valid as it stands.
    assert Config().validate() == load_config()


@pytest.mark.parametrize("overrides, message", [
    (["--base_lr", "nan"], "base_lr must be a finite number, got nan"),
    (["--base_lr", "1e400"], "base_lr must be a finite number, got inf"),
    (["--warmup_epochs", "nan"], "warmup_epochs must be a finite number, got nan"),
    (["--loss_eps", "-inf"], "loss_eps must be a finite number, got -inf"),
    (["--adam_beta1", "1.5"], r"adam_beta1 must be in \[0, 1\), got 1.5"),
    (["--adam_beta2", "-0.1"], r"adam_beta2 must be in \[0, 1\), got -0.1"),
    (["--weight_decay", "-1"], "weight_decay must be >= 0, got -1.0"),
    (["--num_workers", "-1"], "num_workers must be >= 0, got -1"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--batch_size", "-4"], "batch_size must be >= 0, got -4"),
    (["--max_steps", "-1"], "max_steps must be >= 0, got -1"),
    (["--base_lr", "0"], "base_lr must be > 0"),
])
def test_non_finite_or_impossible_hyperparameters_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_yaml_with_a_non_string_key_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text in ("1: 2\n", "[a, b]: 3\n", "null: 1\n"):
        bad.write_text(text)
        with pytest.raises(ConfigError, match="config keys must be strings|found unhashable key") as info:
            load_config(str(bad))
        assert "\n" not in str(info.value)


def test_architecture_keys_are_the_fields_that_fix_weight_shapes():
    keys = Config.architecture_keys()
    assert {"model", "patch_size", "image_size", "decoder_width", "teacher", "teacher_stage"} <= set(keys)
    assert not {"base_lr", "batch_size", "mask_ratio", "seed", "output_dir"} & set(keys)
    assert set(keys) <= set(Config.__dataclass_fields__)


def test_every_field_has_a_group_and_a_one_line_help():
    for cls in (Config, FinetuneConfig):
        for f in fields(cls):
            assert f.metadata["group"] in GROUPS and f.metadata["help"] and "\n" not in f.metadata["help"], f.name


def test_finetune_config_uses_the_same_loader(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"encoder": "run", "data_path": str(tmp_path), "epochs": 3}))
    cfg = load_config(str(path), ["--epochs", "5", "--batch_size", "16"], FinetuneConfig)
    assert (cfg.encoder, cfg.epochs, cfg.batch_size) == ("run", 5, 16)
    with pytest.raises(ConfigError, match="data_path must be a folder with train/ and val/"):
        load_config(None, ["--encoder", "run"], FinetuneConfig)


def test_run_config_reads_a_saved_config_without_revalidating(tmp_path):
    cfg = load_config(None, ["--image_size", "64"])
    cfg.save(str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + "a_key_from_another_version: 1\n")
    assert run_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("preset", ["pretrain_vit_base", "pretrain_vit_large", "pretrain_vit_huge"])
def test_each_preset_reaches_the_global_batch_it_states(preset, tmp_path):
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml"
    stated = re.search(r"Global batch (\d+) on\s+(?:#\s*)?(\d+) GPUs", path.read_text())
    assert stated, f"{path.name} must say 'Global batch G on N GPUs' in its header"
    global_batch, gpus = map(int, stated.groups())
    cfg = load_config(str(path), ["--teacher_weights", "random", "--data_path", str(tmp_path)])
    assert cfg.batch_size * cfg.accum_iter * gpus == global_batch
