"""The run configuration: one typed dataclass, overridable from a YAML file and `--key value` flags.

Precedence: dataclass defaults < YAML file (`--config run.yaml`) < command-line flags.
The defaults are the embedded smoke run (a tiny ViT on the bundled sample photographs,
a few minutes on a laptop CPU); real runs start from a preset in configs/*.yaml.

Engine concerns (micro-batch, gradient accumulation, precision, ZeRO stage, clipping) are
not here: the DeepSpeed JSON owns them and train.py reads them from it.
"""
import dataclasses
import difflib
import os
from dataclasses import dataclass, fields
from typing import Any

import yaml

from img2vec.vit import ATTN_IMPLS, VIT_SIZES

LOSS_IMPLS = ("auto", "triton", "reference")
DATA_BACKENDS = ("auto", "dali", "torch")
FUSED_OPTIMS = ("auto", "apex", "torch")


class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message is one line saying how."""


@dataclass
class Config:
    # Student: encoder size preset, patch grid, MAE-style light decoder.
    model: str = "vit_tiny"  # vit_tiny | vit_small | vit_base | vit_large | vit_huge
    patch_size: int = 16  # 0 = the preset's own (16; 14 for vit_huge)
    image_size: int = 96
    decoder_depth: int = 2
    decoder_width: int = 128
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    # Teacher: a timm CNN, the feature stage (timm features_only index), its weights.
    teacher: str = "resnet50"
    teacher_stage: int = 3  # resnet50: stride 16, C=1024
    teacher_weights: str = ""  # a local .safetensors/.pth file, or "random" (said explicitly)
    # Loss: smooth-L1 on layer-normed teacher features of the masked patches.
    loss_beta: float = 2.0
    loss_eps: float = 1e-6
    # Data: an ImageFolder tree or a file list; "" = the bundled sample photographs.
    data_path: str = ""
    data_backend: str = "auto"
    num_workers: int = 2
    # Schedule: epochs over the data (or a fixed number of optimizer steps), MAE's LR rule.
    epochs: int = 25
    max_steps: int = 0  # > 0 overrides epochs
    base_lr: float = 2e-3  # lr = base_lr * global_batch / 256 (smoke run; MAE presets use 1.5e-4)
    min_lr: float = 0.0
    warmup_epochs: float = 2.0
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # < 0: constant weight decay; else cosine to this value
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    # Run bookkeeping.
    output_dir: str = "runs/img2vec"
    log_every: int = 5  # optimizer steps between logged metrics (the only host syncs)
    ckpt_every: int = 25  # optimizer steps between checkpoints; 0 = only at the end
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    keep_last: int = 3  # complete checkpoints kept on disk (0 = all)
    trust_checkpoint: bool = False  # allow checkpoints that unpickle arbitrary objects (runs their code)
    max_nonfinite_steps: int = 5  # consecutive skipped (NaN/inf loss) steps before the run stops
    eval_data: str = ""  # ImageFolder root with train/ and val/: in-training kNN top-1
    eval_every: int = 0  # optimizer steps between kNN evaluations on eval_data; 0 = off
    diversity_every: int = 25  # optimizer steps between token-diversity readings (collapse alarm); 0 = off
    seed: int = 0
    # Fast-path switches (auto picks the fastest that runs here and logs it).
    loss_impl: str = "auto"
    attn_impl: str = "auto"
    fused_optim: str = "auto"
    compile: bool = False  # torch.compile the student and the teacher (GPU; slow to warm up on CPU)
    grad_ckpt: int = 0  # encoder blocks that recompute activations in backward (0 = none)

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
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("data_backend", self.data_backend, DATA_BACKENDS)
        _check_choice("fused_optim", self.fused_optim, FUSED_OPTIMS)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        p = self.resolved_patch_size
        if p <= 0 or self.image_size <= 0 or self.image_size % p:
            raise ConfigError(f"image_size {self.image_size} is not divisible by patch_size {p}: "
                              f"use a multiple of {p} (e.g. {max(p, self.image_size // p * p)})")
        width = VIT_SIZES[self.model].width
        if not 0 <= self.grad_ckpt <= VIT_SIZES[self.model].depth:
            raise ConfigError(f"grad_ckpt must be in 0..{VIT_SIZES[self.model].depth} (encoder depth "
                              f"of {self.model}), got {self.grad_ckpt}")
        for name, value in (("decoder_width", self.decoder_width), ("decoder_heads", self.decoder_heads),
                            ("decoder_depth", self.decoder_depth), ("epochs", self.epochs)):
            if value <= 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
            raise ConfigError(f"decoder_width {self.decoder_width} must be divisible by decoder_heads "
                              f"{self.decoder_heads} and by 4")
        assert width % 4 == 0
        if self.loss_beta <= 0 or self.loss_eps <= 0:
            raise ConfigError(f"loss_beta and loss_eps must be > 0, got {self.loss_beta}, {self.loss_eps}")
        if self.base_lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ConfigError("base_lr must be > 0, min_lr and warmup_epochs >= 0")
        if self.log_every <= 0 or self.max_nonfinite_steps <= 0:
            raise ConfigError("log_every and max_nonfinite_steps must be > 0")
        if min(self.ckpt_every, self.max_steps, self.diversity_every, self.keep_last, self.eval_every) < 0:
            raise ConfigError("ckpt_every, max_steps, diversity_every, keep_last and eval_every must be >= 0")
        if self.teacher_weights == "" and not self.uses_sample_data:
            raise ConfigError("set teacher_weights to a local .safetensors/.pth file of the teacher "
                              "(or 'random' to train against an untrained teacher)")
        if self.teacher_weights not in ("", "random") and not os.path.isfile(self.teacher_weights):
            raise ConfigError(f"teacher_weights file not found: {self.teacher_weights} "
                              f"(pass a local .safetensors/.pth file, or 'random')")
        if self.data_path and not os.path.exists(self.data_path):
            raise ConfigError(f"data_path does not exist: {self.data_path} "
                              f"(pass an ImageFolder directory or a text file list)")
        if self.eval_every and not all(os.path.isdir(os.path.join(self.eval_data, s)) for s in ("train", "val")):
            raise ConfigError("eval_every needs eval_data: a folder with train/ and val/ ImageFolders")
        from img2vec.teacher import validate_teacher_stage  # builds on the meta device: cheap

        try:
            validate_teacher_stage(self.teacher, self.teacher_stage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got '{value}'")


_FIELDS = {f.name: f for f in fields(Config)}


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise one clear line."""
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else " (see img2vec/config.py for the keys)"
        raise ConfigError(f"unknown config key '{key}'{hint}")
    kind = _FIELDS[key].type
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind)
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
        except (TypeError, ValueError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")


def load_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `--key value` / `--key=value` overrides; validated."""
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
        values.update({k: _coerce(k, v) for k, v in data.items()})
    values.update(_parse_overrides(overrides or []))
    return Config(**values).validate()


def _parse_overrides(args: list[str]) -> dict[str, Any]:
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
            elif key in _FIELDS and _FIELDS[key].type is bool:
                value = True  # a bare boolean flag: --trust-checkpoint
            else:
                raise ConfigError(f"--{key} needs a value")
        values[key] = _coerce(key, value)
        i += 1
    return values
