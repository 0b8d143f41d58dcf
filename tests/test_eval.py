"""Evaluations: kNN and linear probe (by hand, then as commands on the digits), encoder loading
from every checkpoint form, layer-wise LR decay, and fine-tuning under DeepSpeed (pretrained vs random)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import exit_code
from eval_helpers import PROOF_STEPS, digits_root, digits_run
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from train_helpers import REPO, free_port, truncate, write_ds_config

from img2vec.checkpoint import step_tag
from img2vec.eval.common import find_checkpoint, load_encoder, load_encoder_state
from img2vec.eval.knn import knn_scores, topk_accuracy
from img2vec.eval.linear_probe import train_linear_probe
from img2vec.config import ConfigError, FinetuneConfig, load_config
from img2vec.finetune import layer_id, param_groups_lrd


def test_knn_scores_are_temperature_weighted_votes_of_the_k_nearest():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])  # unit rows
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # not unit: knn_scores normalizes
    scores = knn_scores(train, labels, query, num_classes=3, k=2, temperature=0.5)
    # nearest two: train 0 (cos 1.0, class 0) and train 1 (cos 0.8, class 1); train 2, 3 get no vote
    torch.testing.assert_close(scores, torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5), 0.0]]))
    assert topk_accuracy(scores, torch.tensor([0]), (1, 2)) == {"top1": 100.0, "top2": 100.0}
    assert topk_accuracy(scores, torch.tensor([1]), (1, 2)) == {"top1": 0.0, "top2": 100.0}


def gaussian_clusters(n_per_class: int, num_classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_linear_probe_separates_clusters(optimizer):
    x, y = gaussian_clusters(40, 5, 16, seed=0)
    vx, vy = gaussian_clusters(20, 5, 16, seed=0)  # same centers (same seed), other draws would differ
    vx = vx + 0.1 * torch.randn_like(vx)
    blr = 0.1 if optimizer == "sgd" else 20.0  # LARS steps are 0.001 * |w| / |g|: it needs a large lr
    result = train_linear_probe(x, y, vx, vy, num_classes=5, epochs=30, batch_size=64, blr=blr,
                                optimizer=optimizer, warmup_epochs=3)
    assert result["top1"] >= 95.0, result


def test_layer_decay_scales_each_block_and_spares_norms_from_weight_decay():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)  # every trainable parameter in exactly one group
    L = 4  # depth + 1
    assert layer_id("pos_embed", L) == layer_id("patch_embed.proj.weight", L) == 0
    assert scale[id(named["cls_token"])] == 0.5 ** 4 and scale[id(named["blocks.0.attn.qkv.weight"])] == 0.5 ** 3
    assert scale[id(named["blocks.2.mlp.fc1.weight"])] == 0.5 and scale[id(named["head.weight"])] == 1.0
    assert decay[id(named["blocks.1.norm1.weight"])] == 0.0 and decay[id(named["head.bias"])] == 0.0
    assert decay[id(named["pos_embed"])] == 0.0 and decay[id(named["blocks.1.attn.proj.weight"])] == 0.05


def test_finetune_config_reads_flags_and_refuses_unknown_keys(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    data = ["--encoder", "x", "--data_path", str(tmp_path / "d")]
    cfg = load_config(None, [*data, "--layer_decay=0.65", "--mixup", "0.8"], FinetuneConfig)
    assert (cfg.layer_decay, cfg.mixup, cfg.cutmix, cfg.drop_path) == (0.65, 0.8, 0.0, 0.1)
    with pytest.raises(ConfigError, match=r"unknown config key 'layer_decy' \(did you mean 'layer_decay'\?\)"):
        load_config(None, [*data, "--layer_decy", "0.6"], FinetuneConfig)
    with pytest.raises(ConfigError, match="--init needs a value"):  # the value is never the next flag
        load_config(None, [*data, "--init", "--mixup", "0.8"], FinetuneConfig)
    for bad in (["--base_lr", "nan"], ["--layer_decay", "0"], ["--seed", "-1"], ["--label_smoothing", "1.5"]):
        with pytest.raises(ConfigError):
            load_config(None, [*data, *bad], FinetuneConfig)


def test_finetune_command_help_and_print_config(tmp_path, capsys):
    from img2vec.finetune import main

    assert exit_code(main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{f}" in out for f in FinetuneConfig.__dataclass_fields__)
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val" / "a").mkdir(parents=True)
    ds = str(REPO / "configs" / "ds_zero2.json")
    code = exit_code(main, ["--ds_config", ds, "--encoder", "x", "--data_path", str(tmp_path / "d"),
                            "--batch_size", "7", "--accum-iter", "3", "--print_config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "batch_size: 7\n" in out and "accum_iter: 3\n" in out
    assert exit_code(main, ["--ds_config", ds, "--init", "--data_path", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err


# --- On the digits, with the proof's pretraining run (trained once per session) ---------------


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_every_checkpoint_form_loads_the_same_encoder(tmp_path_factory):
    run = digits_run(tmp_path_factory)
    tag = step_tag(PROOF_STEPS)
    assert find_checkpoint(str(run)).tag == tag and find_checkpoint(str(run / "checkpoints" / tag)).tag == tag
    exported, kwargs = load_encoder_state(str(run / "encoder.safetensors"))
    from_ckpt, kwargs_ckpt = load_encoder_state(str(run / "checkpoints" / tag))
    assert kwargs == kwargs_ckpt and exported.keys() == from_ckpt.keys()
    assert all(torch.equal(exported[k], from_ckpt[k]) for k in exported)
    random = load_encoder(str(run), init="random", seed=0).state_dict()
    assert not torch.equal(random["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


def run_main(module: str, capsys, *args: str) -> tuple[str, dict]:
    """(stdout, the result JSON the command wrote: the path on its last line) of the command's main
    run in this process."""
    import importlib

    code = exit_code(importlib.import_module(module).main, list(args))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("wrote "), out
    with open(last[len("wrote "):]) as f:
        return out, json.load(f)


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_knn_and_linear_probe_commands_on_digits(tmp_path_factory, capsys, one_thread):
    run, data = digits_run(tmp_path_factory), digits_root(tmp_path_factory)
    out = tmp_path_factory.mktemp("eval_results")
    knn_out, knn = run_main("img2vec.eval.knn", capsys, "--encoder", str(run), "--data_path", str(data),
                            "--output_dir", str(out))
    probe_out, probe = run_main("img2vec.eval.linear_probe", capsys, "--encoder", str(run / "encoder.safetensors"),
                                "--data_path", str(data), "--epochs", "90", "--output_dir", str(out))
    print(f"\ndigits: kNN top1 {knn['top1']:.1f}%, linear probe top1 {probe['top1']:.1f}%")
    assert knn["top1"] > 50.0 and probe["top1"] > 85.0  # chance is 10%
    assert knn_out.startswith(f"knn top-1 {knn['top1']:.2f}%") and (out / "knn.json").is_file()
    assert probe_out.startswith(f"linear probe top-1 {probe['top1']:.2f}%") and (out / "linear_probe.json").is_file()


def test_knn_command_says_what_is_wrong_in_one_line(tmp_path, capsys):
    from img2vec.eval.knn import main

    code = exit_code(main, ["--encoder", str(tmp_path / "nope"), "--data_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


FINETUNE_STEPS = 42  # one epoch of the digits at batch 32


def start_finetune(out, encoder, data, init: str) -> subprocess.Popen:
    ds = write_ds_config(out.parent / f"{out.name}_ds.json", 2, 32)
    cmd = [sys.executable, str(REPO / "img2vec" / "finetune.py"), "--ds_config", str(ds), "--encoder", str(encoder),
           "--data_path", str(data), "--init", init, "--output_dir", str(out), "--max_steps", str(FINETUNE_STEPS),
           "--warmup_epochs", "0.25", "--base_lr", "1.6e-2", "--layer_decay", "0.75", "--drop_path", "0.1",
           "--crop_scale_min", "0.5", "--hflip", "0", "--num_workers", "0", "--log_every", "20"]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.log", "w") as log:  # a file, not a pipe: two runs at once never block
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, out) -> dict:
    proc.wait(timeout=900)
    assert proc.returncode == 0, f"finetune.py failed:\n{(out.parent / f'{out.name}.log').read_text()[-5000:]}"
    return json.loads((out / "classifier.json").read_text())


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_finetune_from_pretrained_and_from_random_init_on_digits(tmp_path_factory, tmp_path):
    run, data = digits_run(tmp_path_factory), digits_root(tmp_path_factory)
    # The same recipe and seed from both starting points, side by side (one core each).
    procs = {init: start_finetune(tmp_path / init, run, data, init) for init in ("pretrained", "random")}
    pretrained, random = (finished(procs[init], tmp_path / init) for init in ("pretrained", "random"))
    print(f"\ndigits fine-tune, {FINETUNE_STEPS} steps x 32: from pretrained {pretrained['top1']:.1f}%, "
          f"from random init {random['top1']:.1f}%")
    assert pretrained["top1"] > 20.0 and random["top1"] > 20.0  # chance is 10%; measured 40.4 and 31.1

    # The fine-tuned classifier is a plain timm model: strict load, head included.
    model = VisionTransformer(**pretrained["timm_kwargs"]).eval()
    model.load_state_dict(load_file(str(tmp_path / "pretrained" / "classifier.safetensors")), strict=True)
    assert model.head.out_features == 10 and pretrained["classes"] == [str(c) for c in range(10)]
    rows = [json.loads(line) for line in (tmp_path / "pretrained" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["top1"] == pretrained["top1"] and all(math.isfinite(r.get("loss", 0)) for r in rows)


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_visualize_writes_one_png_per_image(tmp_path_factory, tmp_path, capsys, one_thread):
    from img2vec.visualize import main

    run, data = digits_run(tmp_path_factory), digits_root(tmp_path_factory)
    images = sorted((data / "val" / "3").glob("*.png"))[:2]
    code = exit_code(main, ["--encoder", str(run), "--image_paths", *map(str, images), "--output_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err[-3000:]
    from PIL import Image

    for image in images:
        with Image.open(tmp_path / f"{image.stem}.png") as png:
            assert png.size[0] >= 600 and png.size[1] >= 250  # three readable panels side by side


@pytest.mark.parametrize("module, args", [
    ("img2vec.eval.knn", ["--k", "0"]),
    ("img2vec.eval.knn", ["--temperature", "nan"]),
    ("img2vec.eval.linear_probe", ["--base_lr", "inf"]),
    ("img2vec.eval.linear_probe", ["--epochs", "0"]),
])
def test_eval_commands_refuse_impossible_values_in_one_line(module, args, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--encoder", "x", "--data_path", "y", *args])
    assert info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# --- What the eval commands print and write (a tiny export and a tiny ImageFolder: seconds) ---------


def tiny_export(folder) -> None:
    from img2vec.checkpoint import export_encoder
    from img2vec.vit import VitEncoder

    torch.manual_seed(0)
    encoder = VitEncoder(16, 8, 32, 1, 2)
    folder.mkdir(parents=True, exist_ok=True)
    export_encoder({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, encoder.timm_kwargs(), str(folder))


def tiny_image_folder(root) -> None:
    """root/{train,val}/{dark,bright}/*.png, 16x16: two classes any encoder can tell apart a little."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 3)):
        for label, (low, high) in (("dark", (0, 80)), ("bright", (170, 256))):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(low, high, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


@pytest.mark.parametrize("module, name", [("img2vec.eval.knn", "knn"), ("img2vec.eval.linear_probe", "linear_probe")])
def test_eval_commands_print_percent_and_write_json_beside_the_encoder(module, name, tmp_path, capsys):
    import importlib
    import re

    tiny_export(tmp_path / "export")
    tiny_image_folder(tmp_path / "data")
    main = importlib.import_module(module).main
    extra = ["--epochs", "2", "--warmup_epochs", "1"] if name == "linear_probe" else ["--k", "3"]
    args = ["--encoder", str(tmp_path / "export" / "encoder.safetensors"), "--data_path", str(tmp_path / "data"),
            *extra]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    label = name.replace("_", " ")
    match = re.match(rf"{label} top-1 (\d+\.\d\d)%  top-5 (\d+\.\d\d)%  \(", lines[0])
    assert match, lines  # percent with two decimals, not a long float
    path = tmp_path / "export" / f"{name}.json"
    assert lines[-1] == f"wrote {path}" and oct(path.stat().st_mode & 0o777) == "0o644"
    result = json.loads(path.read_text())
    assert result["eval"] == name and result["init"] == "pretrained" and result["val_images"] == 6
    assert f"{result['top1']:.2f}" == match.group(1) and f"{result['top5']:.2f}" == match.group(2)
    assert result["top5"] == 100.0  # two classes: the right one is always among the top 5

    # The random-init baseline goes beside it under its own name; --output_dir moves both.
    assert main([*args, "--init", "random", "--output_dir", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"{label} (random init) top-1 ")
    assert json.loads((tmp_path / "out" / f"{name}_random_init.json").read_text())["init"] == "random"


def test_knn_command_reports_what_knn_monitor_measures(tmp_path, capsys):
    from img2vec.eval.knn import KnnMonitor, main

    tiny_export(tmp_path / "export")
    tiny_image_folder(tmp_path / "data")
    assert main(["--encoder", str(tmp_path / "export"), "--data_path", str(tmp_path / "data"), "--k", "3"]) == 0
    written = json.loads((tmp_path / "export" / "knn.json").read_text())
    monitor = KnnMonitor(str(tmp_path / "data" / "train"), str(tmp_path / "data" / "val"), 16, k=3)
    measured = monitor.evaluate(load_encoder(str(tmp_path / "export")))
    assert written["top1"] == round(measured["top1"], 4) and written["top5"] == round(measured["top5"], 4)
    assert monitor(load_encoder(str(tmp_path / "export"))) == {f"knn_{k}": v for k, v in measured.items()}


def test_result_path_puts_the_json_beside_each_encoder_form(tmp_path):
    from img2vec.eval.results import result_path

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000050").mkdir(parents=True)
    (run / "encoder.safetensors").write_bytes(b"")
    assert result_path(str(run / "encoder.safetensors"), "knn") == str(run / "knn.json")
    assert result_path(str(run), "knn") == str(run / "knn.json")
    assert result_path(str(run / "checkpoints" / "step_000050"), "knn") == str(run / "knn.step_000050.json")
    assert result_path(str(run / "checkpoints" / "step_000050"), "knn", str(tmp_path / "o")) == \
        str(tmp_path / "o" / "knn.step_000050.json")


def test_eval_transform_resizes_to_256_over_224_and_center_crops():
    """MAE's, dBOT's and DINO's protocol: short side to size / 0.875 (256 for 224), bicubic, center crop."""
    import torchvision.transforms as T
    from PIL import Image

    from img2vec.eval.common import eval_transform

    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and resize.interpolation == T.InterpolationMode.BICUBIC and crop.size == (224, 224)
    assert eval_transform(224, crop_pct=1.0).transforms[0].size == 224
    image = Image.new("RGB", (400, 300))
    assert eval_transform(224)(image).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(224, crop_pct=0)


# --- Unreadable images: skipped, named once and counted, as pretraining does -----------------------


@pytest.mark.parametrize("module, name", [("img2vec.eval.knn", "knn"), ("img2vec.eval.linear_probe", "linear_probe")])
def test_eval_commands_skip_an_unreadable_image_name_it_once_and_count_it(module, name, tmp_path, capsys, caplog):
    import importlib
    import logging

    tiny_export(tmp_path / "export")
    tiny_image_folder(tmp_path / "data")
    broken = tmp_path / "data" / "train" / "bright" / "1.png"
    truncate(broken, 100)
    extra = ["--epochs", "2", "--warmup_epochs", "1"] if name == "linear_probe" else ["--k", "3"]
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        code = importlib.import_module(module).main(["--encoder", str(tmp_path / "export"), "--data_path",
                                                     str(tmp_path / "data"), *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    assert caplog.text.count(f"skipping unreadable image {broken}: truncated PNG") == 1
    assert "7 train / 6 val images, 1 unreadable file skipped (train 1, val 0))" in out.splitlines()[0]
    result = json.loads((tmp_path / "export" / f"{name}.json").read_text())
    assert (result["train_images"], result["train_skipped"], result["val_images"], result["val_skipped"]) == (7, 1, 6, 0)


@pytest.mark.parametrize("module", ["img2vec.eval.knn", "img2vec.eval.linear_probe"])
def test_eval_commands_refuse_a_split_without_a_readable_image_in_one_line(module, tmp_path, capsys):
    import importlib

    tiny_export(tmp_path / "export")
    tiny_image_folder(tmp_path / "data")
    for path in (tmp_path / "data" / "val").glob("*/*.png"):
        truncate(path, 100)
    code = exit_code(importlib.import_module(module).main,
                     ["--encoder", str(tmp_path / "export"), "--data_path", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no usable image in {tmp_path / 'data' / 'val'}: all 6 files are unreadable")


def test_knn_monitor_leaves_unreadable_files_out_and_names_each_once_over_evaluations(tmp_path, caplog):
    """The in-training monitor scores each readable file once (no substitute counted twice) and names a bad
    file at its first evaluation only, however many follow."""
    import logging

    from img2vec.eval.knn import KnnMonitor

    tiny_export(tmp_path / "export")
    tiny_image_folder(tmp_path / "data")
    broken = [tmp_path / "data" / "val" / "dark" / "0.png", tmp_path / "data" / "val" / "dark" / "1.png"]
    for path in broken:  # two in a row: the second is also the first one's would-be substitute
        truncate(path, 100)
    monitor = KnnMonitor(str(tmp_path / "data" / "train"), str(tmp_path / "data" / "val"), 16, k=3)
    encoder = load_encoder(str(tmp_path / "export"))
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        first, second = monitor(encoder), monitor(encoder)
    assert first == second
    assert monitor.images == {"train": 8, "val": 4} and monitor.skipped == {"train": 0, "val": 2}
    assert all(caplog.text.count(f"skipping unreadable image {path}:") == 1 for path in broken), caplog.text
