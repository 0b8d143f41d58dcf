"""Fine-tuning as MAE does it: timm's augmentation and mixup, MAE's pooling, the presets, and a
run that checkpoints, stops on SIGTERM and resumes bitwise."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import exit_code
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from train_helpers import REPO, free_port, truncate, write_ds_config

from img2vec.checkpoint import export_encoder
from img2vec.config import Config, ConfigError, FinetuneConfig, load_config
from img2vec.finetune import build_classifier, build_mixup, train_transform, with_output_dir
from img2vec.vit import VitEncoder

FINETUNE = REPO / "img2vec" / "finetune.py"
PRESETS = ("finetune_vit_base", "finetune_vit_large", "finetune_vit_huge")


def tiny_encoder(depth: int = 2, seed: int = 0) -> VitEncoder:
    """A 32x32, patch 8, width 32 encoder whose final norm is far from the identity."""
    torch.manual_seed(seed)
    enc = VitEncoder(32, 8, 32, depth=depth, heads=2)
    with torch.no_grad():
        enc.norm.weight.uniform_(0.2, 3.0)
        enc.norm.bias.normal_(0.0, 1.0)
    return enc


def export(enc: VitEncoder, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    export_encoder({f"encoder.{k}": v for k, v in enc.state_dict().items()}, enc.timm_kwargs(), str(out))
    return out / "encoder.safetensors"


def image_tree(root: Path, per_class: int = 16, classes: int = 3) -> Path:
    """train/ and val/ ImageFolders of 32x32 PNGs: a class is a colour, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / str(c) / f"{i}.png")
    return root


def finetune_cfg(tmp_path, *overrides: str, config: str | None = None) -> FinetuneConfig:
    (tmp_path / "d" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "d" / "val").mkdir(exist_ok=True)
    return load_config(config, ["--encoder", "x", "--data_path", str(tmp_path / "d"), *overrides], FinetuneConfig)


# --- Augmentation: timm's, with MAE's parameters -----------------------------------------------


def test_train_transform_has_randaugment_and_random_erasing_with_maes_parameters(tmp_path):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import RandomHorizontalFlip

    cfg = finetune_cfg(tmp_path, config=str(REPO / "configs" / "finetune_vit_base.yaml"))
    steps = train_transform(cfg, 224).transforms
    crop = steps[0]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation" and crop.scale == (0.08, 1.0)
    assert str(crop.interpolation).lower().endswith("bicubic")
    assert any(isinstance(t, RandomHorizontalFlip) and t.p == 0.5 for t in steps)
    ra = next(t for t in steps if isinstance(t, RandAugment))
    assert ra.num_layers == 2 and len(ra.ops) == 15  # rand-m9-mstd0.5-inc1: n 2, the "increasing" op set
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in ra.ops)
    assert any(op.name == "SolarizeIncreasing" for op in ra.ops)
    erase = steps[-1]
    assert isinstance(erase, RandomErasing) and erase.probability == 0.25 and erase.mode == "pixel"
    assert (erase.min_count, erase.max_count) == (1, 1)
    assert not any("ColorJitter" in type(t).__name__ for t in steps)  # MAE: no colour jitter with RandAugment

    plain = train_transform(finetune_cfg(tmp_path), 32).transforms  # the defaults: crop, flip, normalize
    assert [type(t).__name__ for t in plain] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                 "MaybeToTensor", "Normalize"]


def recover_lambda(x: torch.Tensor, mixed: torch.Tensor) -> float:
    """The weight of each image's own label, read off the pixels: cutmix pastes a box from the
    flipped batch (the fraction of unchanged pixels), mixup blends lam * x + (1 - lam) * x.flip(0)."""
    other = x.flip(0)
    same = (mixed == x).all(dim=1)  # (B, H, W): cutmix keeps these pixels
    if same.float().mean() < 1.0 and torch.equal(mixed[~same.unsqueeze(1).expand_as(x)],
                                                 other[~same.unsqueeze(1).expand_as(x)]):
        return same[0].float().mean().item()
    d = x - other
    return ((mixed - other) * d).sum().item() / (d * d).sum().item()  # least squares over every pixel


def test_mixup_and_cutmix_mix_labels_as_timm_does_and_the_loss_is_soft_target_cross_entropy(tmp_path):
    from timm.loss import SoftTargetCrossEntropy

    cfg = finetune_cfg(tmp_path, config=str(REPO / "configs" / "finetune_vit_base.yaml"))
    mixup, criterion = build_mixup(cfg, num_classes=5)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert (mixup.mix_prob, mixup.switch_prob, mixup.mode) == (1.0, 0.5, "batch")
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    smooth = F.one_hot(labels, 5).float() * (1 - 0.1) + 0.1 / 5  # timm's smoothed one-hot
    modes = set()
    for seed in range(12):
        np.random.seed(seed)
        x = torch.rand(6, 3, 16, 16) + 0.5
        mixed, soft = mixup(x.clone(), labels)
        lam = recover_lambda(x, mixed)
        modes.add("cutmix" if (mixed == x).all(dim=1).any() else "mixup")
        torch.testing.assert_close(soft, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5, rtol=0)
        logits = torch.randn(6, 5)
        torch.testing.assert_close(criterion(logits, soft), (-soft * logits.log_softmax(-1)).sum(-1).mean())
    assert modes == {"mixup", "cutmix"}  # switch prob 0.5: both happen in 12 batches


# --- Pooling: MAE's --------------------------------------------------------------------------


def test_avg_pooling_is_maes_mean_of_patch_tokens_then_a_new_fc_norm():
    enc = tiny_encoder(depth=2)
    state = enc.state_dict()
    model, kwargs = build_classifier(state, enc.timm_kwargs(), 4, "avg", drop_path=0.0)
    model.eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a readable head (MAE's init is near zero)
        model.fc_norm.weight.uniform_(0.5, 1.5)
        images = torch.randn(3, 3, 32, 32)
        # The hand-written MAE forward (models_vit.py forward_features with global_pool):
        x = enc.patch_embed(images) + state["pos_embed"][:, 1:]  # (B, N, D)
        x = torch.cat([(state["cls_token"] + state["pos_embed"][:, :1]).expand(3, -1, -1), x], dim=1)
        for block in enc.blocks:
            x = block(x)  # (B, 1 + N, D), no final norm
        pooled = F.layer_norm(x[:, 1:].mean(dim=1), (32,), model.fc_norm.weight, model.fc_norm.bias, 1e-6)
        torch.testing.assert_close(model(images), pooled @ model.head.weight.T + model.head.bias)
        # The pretrained final norm is not loaded (MAE leaves it out): timm's `norm` is the identity.
        assert isinstance(model.norm, torch.nn.Identity) and kwargs["global_pool"] == "avg"
        assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
        # The old order (norm per token, then the mean) is another feature on this encoder.
        old = enc.norm(x)[:, 1:].mean(dim=1)
        ours = model.forward_head(model.forward_features(images), pre_logits=True)  # (B, D)
        assert F.cosine_similarity(old, ours).mean() < 0.99

    cls_model, _ = build_classifier(state, enc.timm_kwargs(), 4, "cls", drop_path=0.0)
    cls_model.eval()
    with torch.no_grad():  # pool cls: the class token after the pretrained norm
        torch.testing.assert_close(cls_model.forward_head(cls_model.forward_features(images), pre_logits=True),
                                   enc.eval()(images)[:, 0])


# --- Presets ---------------------------------------------------------------------------------


EXPECTED = {  # MAE's FINETUNE.md: (base_lr, layer_decay, drop_path, epochs, global batch)
    "finetune_vit_base": (5e-4, 0.65, 0.1, 100, 1024),
    "finetune_vit_large": (1e-3, 0.75, 0.2, 50, 1024),
    "finetune_vit_huge": (1e-3, 0.75, 0.3, 50, 1024),
}


@pytest.mark.parametrize("name", PRESETS)
def test_finetune_presets_load_and_carry_maes_values(tmp_path, name):
    path = REPO / "configs" / f"{name}.yaml"
    cfg = finetune_cfg(tmp_path, config=str(path))
    blr, ld, dp, epochs, batch = EXPECTED[name]
    assert (cfg.base_lr, cfg.layer_decay, cfg.drop_path, cfg.epochs) == (blr, ld, dp, epochs)
    assert (cfg.auto_augment, cfg.re_prob, cfg.re_mode, cfg.mixup, cfg.cutmix, cfg.label_smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 0.8, 1.0, 0.1)
    assert (cfg.weight_decay, cfg.warmup_epochs, cfg.min_lr, cfg.pool) == (0.05, 5.0, 1e-6, "avg")
    assert cfg.batch_size * cfg.accum_iter * 8 == batch  # the stated 8 GPUs
    text = path.read_text()
    for line in text.splitlines():  # every value says where it comes from
        if line and not line.startswith((" ", "#")) and ":" in line:
            assert "#" in line, f"{name}: no source for {line!r}"


def test_finetune_deepspeed_json_does_not_clip():
    ds = json.loads((REPO / "configs" / "ds_finetune.json").read_text())
    assert ds.get("gradient_clipping", 0.0) == 0.0 and ds["zero_optimization"]["stage"] in (1, 2)


@pytest.mark.parametrize("name, clip, drop_path", [
    ("pretrain_vit_base", 3.0, 0.2), ("pretrain_vit_large", 0.0, 0.2), ("pretrain_vit_huge", 0.0, 0.3)])
def test_pretrain_presets_follow_dbot_drop_path_and_clipping(name, clip, drop_path, tmp_path):
    """Each preset names its paper in its first line and its DeepSpeed JSON in its command line;
    dBOT: student drop path 0.2 (B, L) / 0.3 (H), gradient clipping 3.0 for ViT-B only."""
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "dBOT" in text.splitlines()[0] and "MAE" in text
    ds_json = re.search(r"deepspeed .*--ds_config (\S+)", text).group(1)
    assert json.loads((REPO / ds_json).read_text()).get("gradient_clipping", 0.0) == clip
    data = yaml.safe_load(text)
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"")
    data.update(teacher_weights=str(weights), data_path=str(tmp_path))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(str(tmp_path / "run.yaml"), [], Config)
    assert (cfg.drop_path, cfg.epochs) == (drop_path, 1600)
    with pytest.raises(ConfigError, match=r"drop_path must be in \[0, 1\), got 1.0"):
        load_config(str(tmp_path / "run.yaml"), ["--drop_path", "1.0"], Config)


def test_linear_probe_preset_parses_with_the_linear_probe_command(tmp_path, capsys):
    """Every key of configs/linear_probe.yaml is a flag of img2vec.eval.linear_probe with a value
    it accepts: the command gets past its parser and stops only at the missing encoder."""
    data = yaml.safe_load((REPO / "configs" / "linear_probe.yaml").read_text())
    assert (data["optimizer"], data["base_lr"], data["epochs"], data["warmup_epochs"], data["weight_decay"]) == \
        ("lars", 0.1, 90, 10, 0.0)
    from img2vec.eval.linear_probe import main

    argv = [x for k, v in data.items() for x in (f"--{k}", str(v))]
    code = exit_code(main, [*argv, "--encoder", str(tmp_path / "missing"), "--data_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "unrecognized" not in err and "invalid" not in err, err
    assert "missing" in err, err


def test_output_dir_is_derived_from_the_encoders_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (run / "encoder.safetensors").write_bytes(b"")
    base = finetune_cfg(tmp_path)
    import dataclasses

    def derived(encoder, init="pretrained"):
        return with_output_dir(dataclasses.replace(base, encoder=str(encoder), init=init)).output_dir

    assert derived(run) == str(run / "finetune") == derived(run / "encoder.safetensors")
    assert derived(run, "random") == str(run / "finetune_random")
    assert derived(run / "checkpoints" / "step_000010") == str(run / "finetune_step_000010")
    assert with_output_dir(dataclasses.replace(base, output_dir="elsewhere")).output_dir == "elsewhere"


# --- Runs: every preset at tiny size, and a SIGTERM mid-run that resumes bitwise ---------------


TINY = ("--batch_size", "4", "--accum_iter", "1", "--num_workers", "0", "--log_every", "1", "--warmup_epochs", "0")


def run_finetune(tmp_path: Path, out: Path, *extra: str, delay: float = 0.0, wait: bool = True):
    """finetune.py in a real process (each optimizer step slowed by `delay` seconds, so a signal
    lands mid-run); its combined output goes to out.log."""
    enc = tmp_path / "enc" / "encoder.safetensors"
    if not enc.exists():
        export(tiny_encoder(), tmp_path / "enc")
    data = tmp_path / "data"
    if not data.exists():
        image_tree(data)
    ds = write_ds_config(tmp_path / "ds.json", 2, 4)
    args = ["--ds_config", str(ds), "--encoder", str(enc), "--data_path", str(data), "--output_dir", str(out),
            *TINY, *extra]
    slow = ("import sys, time, runpy; from deepspeed.runtime.engine import DeepSpeedEngine as E; s = E.step; "
            f"E.step = lambda self, *a, **k: (time.sleep({delay}), s(self, *a, **k))[1]; "
            f"sys.argv = [{str(FINETUNE)!r}] + sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", slow, *args] if delay else [sys.executable, str(FINETUNE), *args]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    log = open(f"{out}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    proc.wait(timeout=600)
    assert proc.returncode == 0, Path(f"{out}.log").read_text()[-4000:]
    return proc


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", PRESETS)
def test_each_finetune_preset_runs_three_steps_at_tiny_size(tmp_path, name):
    out = tmp_path / "out"
    run_finetune(tmp_path, out, "--config", str(REPO / "configs" / f"{name}.yaml"), "--max_steps", "3")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows
                                                                         if "loss" in r)
    result = json.loads((out / "classifier.json").read_text())
    assert result["timm_kwargs"]["global_pool"] == "avg" and "top1" in result
    from timm.models.vision_transformer import VisionTransformer

    VisionTransformer(**result["timm_kwargs"]).load_state_dict(load_file(str(out / "classifier.safetensors")))


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_finetune_resumes_bitwise_after_sigterm(tmp_path):
    """12 images per step... 12 steps (one epoch is 12 steps of 4): stopped by SIGTERM part-way,
    then the same command again, ends with the same weights bit for bit as a run never stopped.
    With mixup, cutmix, RandAugment, RandomErasing and drop path on: every RNG must line up."""
    recipe = ("--max_steps", "14", "--base_lr", "0.05", "--auto_augment", "rand-m9-mstd0.5-inc1", "--re_prob", "0.25",
              "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--ckpt_every", "5")
    whole = tmp_path / "whole"
    run_finetune(tmp_path, whole, *recipe)

    stopped = tmp_path / "stopped"
    proc = run_finetune(tmp_path, stopped, *recipe, delay=0.5, wait=False)
    deadline = time.time() + 300
    while not (stopped / "metrics.jsonl").exists() or len((stopped / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() < deadline and proc.poll() is None, Path(f"{stopped}.log").read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    log = Path(f"{stopped}.log").read_text()
    assert proc.returncode == 0 and "stopped by SIGTERM at step" in log, log[-3000:]
    stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 2 <= stopped_at < 14 and not (stopped / "classifier.safetensors").exists()

    run_finetune(tmp_path, stopped, *recipe)
    assert f"(step {stopped_at})" in Path(f"{stopped}.log").read_text()  # it resumed, not restarted
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert {"step": stopped_at, "event": "resumed", "total_steps": 14} in rows
    assert (stopped / "config.000000.yaml").is_file() and (stopped / f"config.{stopped_at:06d}.yaml").is_file()
    a, b = load_file(str(whole / "classifier.safetensors")), load_file(str(stopped / "classifier.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = json.loads((whole / "classifier.json").read_text())
    assert json.loads((stopped / "classifier.json").read_text())["top1"] == before["top1"]


@pytest.mark.e2e  # a real finetune.py process: set-up (process group, DeepSpeed) stays out of the test process
def test_a_missing_encoder_or_an_odd_mixup_batch_is_one_line_exit_2(tmp_path):
    data = image_tree(tmp_path / "data", per_class=2, classes=2)
    ds = write_ds_config(tmp_path / "ds.json", 2, 4)
    enc = export(tiny_encoder(), tmp_path / "enc")
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for args, message in (
            (["--encoder", str(tmp_path / "nope")], "does not exist"),
            (["--encoder", str(enc), "--mixup", "0.8", "--batch_size", "3"], "use an even batch_size, got 3")):
        proc = subprocess.run([sys.executable, str(FINETUNE), "--ds_config", str(ds), "--data_path", str(data),
                               "--output_dir", str(tmp_path / "out"), *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_randaugment_posterize_at_full_magnitude_gives_black_instead_of_crashing(tmp_path):
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (reached by m9 mstd0.5); this Pillow
    refuses 0 bits. What older Pillow and TF return, a black image, is what we return."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    cfg = finetune_cfg(tmp_path, config=str(REPO / "configs" / "finetune_vit_base.yaml"))
    ra = next(t for t in train_transform(cfg, 32).transforms if isinstance(t, RandAugment))
    op = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # 2 bits kept: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(img)).max() == 192


def test_an_images_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    """The same (epoch, index) gives the same tensor in the trainer's process and in a worker, in
    any order; another epoch gives another augmentation; the caller's RNGs are left as they were."""
    from torch.utils.data import DataLoader

    from img2vec.eval.common import collate_readable, labeled_split
    from img2vec.finetune import SeededSamples

    data = image_tree(tmp_path / "data", per_class=4, classes=2)
    cfg = finetune_cfg(tmp_path, config=str(REPO / "configs" / "finetune_vit_base.yaml"))
    samples = SeededSamples(labeled_split(str(data / "train"), train_transform(cfg, 32), substitute=True), seed=3)
    keys = [(e, i) for e in (0, 1) for i in range(len(samples))]
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    here = [samples[k][0] for k in reversed(keys)][::-1]
    assert torch.equal(torch.rand(1), before)  # the trainer's RNG did not move
    in_workers = [x for batch, _, _ in DataLoader(samples, 4, sampler=keys, num_workers=2, collate_fn=collate_readable)
                  for x in batch]
    assert all(torch.equal(a, b) for a, b in zip(here, in_workers))
    n = len(samples)
    assert not all(torch.equal(here[i], here[n + i]) for i in range(n))  # epochs differ


# --- Unreadable images: skipped, named once and counted, as pretraining does -------------------


def test_an_unreadable_train_image_gives_its_place_to_the_next_file_and_its_label(tmp_path, caplog):
    """As in pretraining: the batch keeps its size, the substitute brings its own label, the skip travels
    back from the worker and is named once."""
    import logging

    from torch.utils.data import DataLoader

    from dataloading.datasets import SkipLog
    from img2vec.eval.common import collate_readable, labeled_split
    from img2vec.finetune import SeededSamples

    data = image_tree(tmp_path / "data", per_class=4, classes=2)  # train files 0-3: class 0, 4-7: class 1
    broken = data / "train" / "0" / "3.png"
    truncate(broken, 300)
    split = labeled_split(str(data / "train"), train_transform(finetune_cfg(tmp_path), 32), substitute=True)
    loader = DataLoader(SeededSamples(split, seed=0), 4, sampler=[(0, i) for i in range(8)], num_workers=2,
                        collate_fn=collate_readable)
    skips = SkipLog()
    labels = []
    with caplog.at_level(logging.WARNING, logger="img2vec.data"):
        for images, batch_labels, skipped in loader:
            skips.add(skipped)
            assert images.shape == (4, 3, 32, 32)
            labels += batch_labels.tolist()
    assert labels == [0, 0, 0, 1, 1, 1, 1, 1]  # file 3's place: file 4, class 1
    assert [name for name, _ in skips.items()] == [str(broken)]
    assert caplog.text.count(f"skipping unreadable image {broken}: truncated PNG") == 1


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_finetune_skips_unreadable_train_and_val_images_names_each_once_and_finishes(tmp_path):
    """Two epochs over 8 train files (every one drawn each epoch, in 2 worker processes) and 4 val files,
    one of each unreadable: the run ends with exit 0 and its classifier, each file named once, both counted."""
    data = image_tree(tmp_path / "data", per_class=4, classes=2)
    broken = [data / "train" / "0" / "1.png", data / "val" / "1" / "0.png"]
    for path in broken:
        truncate(path, 300)
    out = tmp_path / "out"
    run_finetune(tmp_path, out, "--max_steps", "4", "--num_workers", "2")  # 2 steps of 4 images an epoch
    log = Path(f"{out}.log").read_text()
    assert all(log.count(f"skipping unreadable image {path}: truncated PNG") == 1 for path in broken), log[-3000:]
    assert f"rank 0 skipped 2 unreadable file(s), e.g. {broken[0]} (truncated PNG" in log, log[-3000:]
    assert (out / "classifier.safetensors").is_file() and "top1" in json.loads((out / "classifier.json").read_text())


def test_evaluation_runs_as_many_forwards_on_every_rank_as_the_largest_shard_needs(tmp_path, monkeypatch):
    """Under ZeRO-3 each forward gathers parameters from all ranks: a rank with a shorter shard, or
    a batch whose files are all unreadable, must still run its forwards (on a dummy image)."""
    import types

    import torch.distributed as dist

    from dataloading.datasets import SkipLog
    from img2vec.finetune import evaluate

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = types.SimpleNamespace(img_size=(8, 8))
            self.batches = []

        def forward(self, images):  # (B, 3, 8, 8) -> (B, 2) logits: class 1 wins
            self.batches.append(len(images))
            return torch.tensor([[0.0, 1.0]]).expand(len(images), 2)

    image = torch.zeros(3, 8, 8)
    unreadable = (None, -1, [("bad.jpg", "truncated")])
    val = [(image, 1, []), (image, 1, []), (image, 0, []), unreadable, (image, 1, [])]  # rank 1 holds 1 and 3
    monkeypatch.setattr(dist, "all_reduce", lambda t: t)  # one rank's counts stand for the sum
    rt = types.SimpleNamespace(rank=1, world_size=2, micro_batch=1, device=torch.device("cpu"), dtype=torch.float32)
    model, skips = Model(), SkipLog()
    result = evaluate(model, val, rt, seed=0, skips=skips)
    assert model.batches == [1, 1, 1]  # rank 0 has 3 images (0, 2, 4): 3 forwards here too, the last a dummy
    assert result["top1"] == 100.0 and skips.items() == [("bad.jpg", "truncated")]
