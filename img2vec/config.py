"""Run configurations: typed dataclasses, overridable from a YAML file and `--key value` flags.

Precedence: dataclass defaults < YAML file (`--config run.yaml`) < command-line flags.
`Config` is pretraining's; its defaults are the embedded smoke run (a tiny ViT on the bundled
sample photographs, a few minutes on a laptop CPU); real runs start from a preset in
configs/*.yaml. `FinetuneConfig` is fine-tuning's. Both load, validate and print `--help`
through the same functions here: every field carries its group and a one-line meaning.

Engine concerns (precision, ZeRO stage, clipping) are not here: the DeepSpeed JSON owns them.
Its batch keys can be overridden by `batch_size` (per process) and `accum_iter`.
"""
import argparse
import dataclasses
import difflib
import glob
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from img2vec.vit import ATTN_IMPLS, VIT_SIZES

LOSS_IMPLS = ("auto", "triton", "reference")
LOSSES = ("smooth_l1", "mse")
DATA_BACKENDS = ("auto", "dali", "torch")
FUSED_OPTIMS = ("auto", "apex", "torch")
GROUPS = ("model", "teacher", "data", "optimization", "run")


class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message is one line saying how."""


def _key(default: Any, group: str, help: str, arch: bool = False):
    """A config field: its default, its --help group, its one-line meaning; `arch` marks a key
    that fixes the shapes of the weights (a checkpoint written with another value cannot load)."""
    return field(default=default, metadata={"group": group, "help": help, "arch": arch})


class _Loadable:
    """What load_config and build_parser need from a config dataclass."""

    @classmethod
    def architecture_keys(cls) -> tuple[str, ...]:
        """The keys whose values fix the shapes of the weights (checked on resume)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("arch"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def _check_common(self) -> None:
        """Every float finite; counts, seeds and batch sizes never negative."""
        for f in fields(self):
            value = getattr(self, f.name)
            if _kind(f) is float and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for name in ("num_workers", "seed", "batch_size", "accum_iter", "max_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.base_lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"base_lr must be > 0, min_lr and warmup_epochs >= 0; got {self.base_lr}, "
                              f"{self.min_lr}, {self.warmup_epochs}")
        if self.epochs <= 0 or self.log_every <= 0:
            raise ConfigError(f"epochs and log_every must be > 0, got {self.epochs}, {self.log_every}")


@dataclass
class Config(_Loadable):
    """Pretraining (img2vec/train.py)."""
    model: str = _key("vit_tiny", "model", "encoder size: " + " | ".join(VIT_SIZES), arch=True)
    patch_size: int = _key(16, "model", "patch side in pixels; 0 = the preset's own (16; 14 for vit_huge)", arch=True)
    image_size: int = _key(96, "model", "input side in pixels (a multiple of patch_size)", arch=True)
    decoder_depth: int = _key(2, "model", "blocks of the light MAE-style decoder", arch=True)
    decoder_width: int = _key(128, "model", "decoder width (divisible by decoder_heads and by 4)", arch=True)
    decoder_heads: int = _key(4, "model", "decoder attention heads", arch=True)
    mask_ratio: float = _key(0.5, "model", "fraction of patches masked, in (0, 1) (presets: 0.75)")
    teacher: str = _key("auto", "teacher", "hog | pixels (no weights) | a timm model name | auto: resnet50 "
                        "when teacher_weights is given (a file or 'random'), hog on the bundled sample "
                        "images; with your own data_path, give teacher_weights or a teacher", arch=True)
    teacher_stage: int = _key(3, "teacher", "timm features_only stage (resnet50 3: stride 16, C=1024)",
                              arch=True)
    teacher_weights: str = _key("", "teacher", "a local .safetensors/.pth file, or 'random' (said explicitly)")
    teacher_fold_bn: bool = _key(True, "teacher", "fold the frozen teacher's batch norms into its convolutions "
                                 "(exact up to rounding); false runs them as they are")
    loss_beta: float = _key(2.0, "teacher", "smooth-L1 beta on layer-normed teacher features")
    loss_eps: float = _key(1e-6, "teacher", "epsilon of the teacher features' layer norm")
    loss: str = _key("smooth_l1", "teacher", "smooth_l1 (Img2Vec, beta loss_beta) | mse (MAE with teacher pixels)")
    data_path: str = _key("", "data", "ImageFolder tree, file list or WebDataset shards; '' = bundled samples")
    data_backend: str = _key("auto", "data", "data loader: " + " | ".join(DATA_BACKENDS))
    num_workers: int = _key(2, "data", "decoding worker processes per rank")
    max_image_pixels: int = _key(64_000_000, "data", "larger images (h*w) are skipped with a reason; 0 = no cap")
    epochs: int = _key(45, "optimization", "passes over the data (unless max_steps)")
    max_steps: int = _key(0, "optimization", "optimizer steps; > 0 overrides epochs")
    batch_size: int = _key(0, "optimization", "images per process per micro-step; 0 = the DeepSpeed JSON's")
    accum_iter: int = _key(0, "optimization", "micro-steps per optimizer step; 0 = the DeepSpeed JSON's")
    base_lr: float = _key(1e-3, "optimization", "lr = base_lr * global_batch / 256 (MAE presets: 1.5e-4)")
    min_lr: float = _key(0.0, "optimization", "lr at the end of the cosine schedule")
    warmup_epochs: float = _key(2.0, "optimization", "epochs of linear lr warmup")
    weight_decay: float = _key(0.05, "optimization", "AdamW weight decay (not on norms, biases, tokens)")
    weight_decay_end: float = _key(-1.0, "optimization", "< 0: constant weight decay; else cosine to this")
    adam_beta1: float = _key(0.9, "optimization", "AdamW beta1, in [0, 1)")
    adam_beta2: float = _key(0.95, "optimization", "AdamW beta2, in [0, 1)")
    output_dir: str = _key("runs/img2vec", "run", "run folder: config, metrics, checkpoints, export")
    log_every: int = _key(5, "run", "optimizer steps between logged metrics (the only host syncs)")
    ckpt_every: int = _key(25, "run", "optimizer steps between checkpoints; 0 = only at the end")
    resume: bool = _key(True, "run", "continue from the latest complete checkpoint in output_dir")
    keep_last: int = _key(3, "run", "complete checkpoints kept on disk; 0 = all")
    trust_checkpoint: bool = _key(False, "run", "allow checkpoints that unpickle objects (runs their code)")
    max_nonfinite_steps: int = _key(5, "run", "skipped (NaN/inf loss) steps in a row before the run stops")
    eval_data: str = _key("", "run", "ImageFolder root with train/ and val/ for in-training kNN top-1")
    eval_every: int = _key(0, "run", "optimizer steps between kNN evaluations on eval_data; 0 = off")
    diversity_every: int = _key(25, "run", "optimizer steps between token-diversity readings; 0 = off")
    collapse_fraction: float = _key(0.03, "run", "collapse alarm after warm-up when div_pred < this x div_target")
    verdict_data: str = _key("photos", "run", "end-of-run kNN verdict vs random init on: photos | digits | a "
                             "folder with train/ and val/ | '' = off")
    seed: int = _key(0, "run", "seed of the init, the data order and the masks")
    loss_impl: str = _key("auto", "teacher", "masked feature loss: " + " | ".join(LOSS_IMPLS))
    attn_impl: str = _key("auto", "model", "attention: " + " | ".join(ATTN_IMPLS))
    fused_optim: str = _key("auto", "optimization", "AdamW: " + " | ".join(FUSED_OPTIMS))
    compile: bool = _key(False, "model", "torch.compile student and teacher (GPU; slow warm-up on CPU)")
    grad_ckpt: int = _key(0, "model", "encoder blocks that recompute activations in backward")
    drop_path: float = _key(0.0, "model", "student encoder stochastic depth rate (MAE: 0; dBOT: 0.2 B/L, 0.3 H)")

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size or VIT_SIZES[self.model].patch_size

    @property
    def uses_sample_data(self) -> bool:
        return self.data_path == ""

    def validate(self) -> "Config":
        """Check every field; raise ConfigError with one line saying what to change."""
        _check_choice("model", self.model, tuple(VIT_SIZES))
        _check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("data_backend", self.data_backend, DATA_BACKENDS)
        _check_choice("fused_optim", self.fused_optim, FUSED_OPTIMS)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.max_image_pixels < 0:
            raise ConfigError(f"max_image_pixels must be >= 0 (0: no cap), got {self.max_image_pixels}")
        self._check_common()
        p = self.resolved_patch_size
        if p <= 0 or self.image_size <= 0 or self.image_size % p:
            raise ConfigError(f"image_size {self.image_size} is not divisible by patch_size {p}: "
                              f"use a multiple of {p} (e.g. {max(p, self.image_size // p * p)})")
        if not 0 <= self.grad_ckpt <= VIT_SIZES[self.model].depth:
            raise ConfigError(f"grad_ckpt must be in 0..{VIT_SIZES[self.model].depth} (encoder depth "
                              f"of {self.model}), got {self.grad_ckpt}")
        for name in ("decoder_width", "decoder_heads", "decoder_depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
            raise ConfigError(f"decoder_width {self.decoder_width} must be divisible by decoder_heads "
                              f"{self.decoder_heads} and by 4")
        if self.loss_beta <= 0 or self.loss_eps <= 0:
            raise ConfigError(f"loss_beta and loss_eps must be > 0, got {self.loss_beta}, {self.loss_eps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_nonfinite_steps <= 0:
            raise ConfigError(f"max_nonfinite_steps must be > 0, got {self.max_nonfinite_steps}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if min(self.ckpt_every, self.diversity_every, self.keep_last, self.eval_every) < 0:
            raise ConfigError("ckpt_every, diversity_every, keep_last and eval_every must be >= 0")
        from img2vec.hog import WEIGHT_FREE_TEACHERS, check_patch_size

        if self.teacher == "auto" and not self.teacher_weights and not self.uses_sample_data:
            # on the user's own data, never swap the paper's teacher for another one unasked
            raise ConfigError("with your own data_path, choose the teacher: teacher_weights FILE (ResNet-50 stage 3, "
                              "Img2Vec's teacher), teacher_weights random, or teacher hog / pixels (no weights)")
        if self.teacher == "auto":  # real weights keep the paper's teacher; none: a teacher that needs none
            self.teacher = "resnet50" if self.teacher_weights else "hog" if self.resolved_patch_size % 8 == 0 \
                else "pixels"  # HOG's cells are 8 pixels
        if not 0.0 < self.collapse_fraction < 1.0:
            raise ConfigError(f"collapse_fraction must be in (0, 1), got {self.collapse_fraction}")
        if self.verdict_data not in ("", "photos", "digits") and not all(
                os.path.isdir(os.path.join(self.verdict_data, s)) for s in ("train", "val")):
            raise ConfigError(f"verdict_data must be photos, digits, '' (off) or a folder with train/ and val/, "
                              f"got {self.verdict_data!r}")
        if self.teacher in WEIGHT_FREE_TEACHERS:
            try:
                check_patch_size(self.teacher, self.resolved_patch_size)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.teacher_weights == "" and not self.uses_sample_data and self.teacher not in WEIGHT_FREE_TEACHERS:
            raise ConfigError("set teacher_weights to a local .safetensors/.pth file of the teacher "
                              "(or 'random' to train against an untrained teacher)")
        if self.teacher_weights not in ("", "random") and not os.path.isfile(self.teacher_weights):
            raise ConfigError(f"teacher_weights file not found: {self.teacher_weights} "
                              f"(pass a local .safetensors/.pth file, or 'random')")
        if self.data_path and not os.path.exists(self.data_path) and not glob.glob(self.data_path):
            raise ConfigError(f"data_path does not exist: {self.data_path} (pass an ImageFolder directory, a text "
                              f"file list, or WebDataset .tar shards: one, a folder of them, or a glob in quotes)")
        if self.eval_every and not all(os.path.isdir(os.path.join(self.eval_data, s)) for s in ("train", "val")):
            raise ConfigError("eval_every needs eval_data: a folder with train/ and val/ ImageFolders")
        from img2vec.teacher import validate_teacher_stage  # builds on the meta device: cheap

        try:
            validate_teacher_stage(self.teacher, self.teacher_stage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


@dataclass
class FinetuneConfig(_Loadable):
    """Fine-tuning for classification (img2vec/finetune.py), MAE's main_finetune.py recipe."""
    encoder: str = _key("", "model", "encoder.safetensors, a run folder, or run/checkpoints/<tag>")
    init: str = _key("pretrained", "model", "pretrained | random (same architecture, seeded init: the baseline)")
    pool: str = _key("avg", "model", "avg (MAE: mean of patch tokens, then a new fc_norm) | cls (after the norm)")
    drop_path: float = _key(0.1, "model", "stochastic depth rate")
    data_path: str = _key("", "data", "ImageFolder root with train/ and val/")
    num_workers: int = _key(2, "data", "decoding worker processes per rank")
    crop_scale_min: float = _key(0.08, "data", "RandomResizedCrop area fraction lower bound, in (0, 1]")
    hflip: float = _key(0.5, "data", "horizontal flip probability (0 for digits and text)")
    auto_augment: str = _key("", "data", "timm RandAugment policy; '' = off (MAE: rand-m9-mstd0.5-inc1)")
    re_prob: float = _key(0.0, "data", "timm RandomErasing probability (MAE: 0.25)")
    re_mode: str = _key("pixel", "data", "RandomErasing fill: pixel (MAE) | rand | const")
    re_count: int = _key(1, "data", "RandomErasing regions per image (MAE: 1)")
    mixup: float = _key(0.0, "data", "mixup alpha; 0 = off (MAE ImageNet: 0.8)")
    cutmix: float = _key(0.0, "data", "cutmix alpha; 0 = off (MAE ImageNet: 1.0)")
    label_smoothing: float = _key(0.1, "optimization", "label smoothing of the cross-entropy, in [0, 1)")
    epochs: int = _key(100, "optimization", "passes over the data (unless max_steps)")
    max_steps: int = _key(0, "optimization", "optimizer steps; > 0 overrides epochs")
    batch_size: int = _key(0, "optimization", "images per process per micro-step; 0 = the DeepSpeed JSON's")
    accum_iter: int = _key(0, "optimization", "micro-steps per optimizer step; 0 = the DeepSpeed JSON's")
    base_lr: float = _key(1e-3, "optimization", "lr = base_lr * global_batch / 256")
    min_lr: float = _key(1e-6, "optimization", "lr at the end of the cosine schedule")
    warmup_epochs: float = _key(5.0, "optimization", "epochs of linear lr warmup")
    layer_decay: float = _key(0.75, "optimization", "lr of block i = lr * layer_decay ** (depth - i); MAE: B 0.65")
    weight_decay: float = _key(0.05, "optimization", "AdamW weight decay (not on norms, biases, tokens)")
    output_dir: str = _key("", "run", "run folder; '' = <encoder's run>/finetune[_<tag>][_random]")
    log_every: int = _key(10, "run", "optimizer steps between logged metrics (the only host syncs)")
    ckpt_every: int = _key(0, "run", "optimizer steps between checkpoints; 0 = after each epoch's evaluation")
    resume: bool = _key(True, "run", "continue from the latest complete checkpoint in output_dir")
    keep_last: int = _key(2, "run", "complete checkpoints kept on disk; 0 = all")
    trust_checkpoint: bool = _key(False, "run", "allow checkpoints that unpickle objects (runs their code)")
    max_nonfinite_steps: int = _key(5, "run", "skipped (NaN/inf loss) steps in a row before the run stops")
    seed: int = _key(0, "run", "seed of the head init, the data order and mixup")

    def validate(self) -> "FinetuneConfig":
        if not self.encoder:
            raise ConfigError("set --encoder (encoder.safetensors, a run folder or run/checkpoints/<tag>)")
        if not all(os.path.isdir(os.path.join(self.data_path, s)) for s in ("train", "val")) or not self.data_path:
            raise ConfigError(f"data_path must be a folder with train/ and val/ ImageFolder splits, "
                              f"got {self.data_path!r}")
        _check_choice("init", self.init, ("pretrained", "random"))
        _check_choice("pool", self.pool, ("avg", "cls"))
        self._check_common()
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not (0 <= self.drop_path < 1 and 0 <= self.label_smoothing < 1 and 0 <= self.hflip <= 1
                and 0 < self.crop_scale_min <= 1):
            raise ConfigError(f"drop_path and label_smoothing must be in [0, 1), hflip in [0, 1], crop_scale_min "
                              f"in (0, 1]; got {self.drop_path}, {self.label_smoothing}, {self.hflip}, "
                              f"{self.crop_scale_min}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"mixup and cutmix must be >= 0, got {self.mixup}, {self.cutmix}")
        _check_choice("re_mode", self.re_mode, ("pixel", "rand", "const"))
        if not 0 <= self.re_prob <= 1 or self.re_count < 1:
            raise ConfigError(f"re_prob must be in [0, 1] and re_count >= 1, got {self.re_prob}, {self.re_count}")
        if self.auto_augment and not self.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a")):
            raise ConfigError(f"auto_augment {self.auto_augment!r} is not a timm policy (e.g. rand-m9-mstd0.5-inc1)")
        if min(self.ckpt_every, self.keep_last) < 0 or self.max_nonfinite_steps <= 0:
            raise ConfigError("ckpt_every and keep_last must be >= 0, max_nonfinite_steps > 0")
        return self


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got '{value}'")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _kind(f: dataclasses.Field) -> type:
    """A field's type as a class (annotations may be strings)."""
    return _TYPES.get(f.type, f.type) if isinstance(f.type, str) else f.type


def _coerce(cls: type, key: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise one clear line."""
    known = {f.name: f for f in fields(cls)}
    if not isinstance(key, str):
        raise ConfigError(f"config keys must be strings, got {key!r} ({type(key).__name__}): quote it or remove it")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else " (--help lists the keys)"
        raise ConfigError(f"unknown config key '{key}'{hint}")
    kind = _kind(known[key])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif kind is int and not isinstance(value, bool):
        try:
            if isinstance(value, str) or float(value) == int(value):
                return int(value)
        except (TypeError, ValueError, OverflowError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")


def load_config(yaml_path: str | None = None, overrides: list[str] | None = None, cls: type = Config):
    """Defaults <- YAML file <- `--key value` / `--key=value` overrides; validated. `cls`: Config
    (pretraining) or FinetuneConfig."""
    values: dict[str, Any] = {}
    if yaml_path:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"config file not found: {yaml_path}")
        with open(yaml_path) as f:
            try:
                data = yaml.safe_load(f) or {}  # safe_load: a config file cannot run code
            except yaml.YAMLError as e:
                raise ConfigError(f"could not parse {yaml_path}: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path} must hold a mapping of config keys, got {type(data).__name__}")
        values.update({k: _coerce(cls, k, v) for k, v in data.items()})
    values.update(_parse_overrides(cls, overrides or []))
    return cls(**values).validate()


def _parse_overrides(cls: type, args: list[str]) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            elif key in known and _kind(known[key]) is bool:
                value = True  # a bare boolean flag: --trust-checkpoint
            else:
                raise ConfigError(f"--{key} needs a value")
        values[key] = _coerce(cls, key, value)
        i += 1
    return values


# --- The command line: every key a flag, --help generated from the fields -------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), as every img2vec command's are."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def option_names(name: str) -> list[str]:
    """`--base_lr` and its dash alias `--base-lr`."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def build_parser(cls: type, description: str) -> OneLineParser:
    """A parser with --config, --print_config and one flag per field of `cls`, grouped; each flag's
    help gives its type, default and meaning. Given flags land in the namespace, others do not."""
    parser = OneLineParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file of config keys (flags override it)")
    parser.add_argument("--print_config", "--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    groups = {g: parser.add_argument_group(f"{g} keys") for g in GROUPS}
    for f in fields(cls):
        kind = _kind(f)
        extra = {"nargs": "?", "const": "true"} if kind is bool else {}
        groups[f.metadata["group"]].add_argument(
            *option_names(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
            help=f"{f.metadata['help']} ({kind.__name__}, default: {f.default!r})", **extra)
    return parser


def config_from_args(cls: type, args: argparse.Namespace):
    """The validated config of a namespace from build_parser: defaults <- --config YAML <- flags."""
    overrides = [f"--{f.name}={getattr(args, f.name)}" for f in fields(cls) if hasattr(args, f.name)]
    return load_config(args.config, overrides, cls)


def run_config(path: str) -> Config:
    """The Config a run saved (its config.yaml), not re-validated: its files may live elsewhere now.
    Keys this version does not know are ignored; missing ones take their defaults."""
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    known = {f.name for f in fields(Config)}
    return Config(**{k: _coerce(Config, k, v) for k, v in saved.items() if k in known})


def print_config(cfg) -> None:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
