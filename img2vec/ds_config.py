"""The DeepSpeed JSON: read it, check it, resolve our "auto" precision, derive the batch keys."""
import json
import os

import torch

from img2vec.config import ConfigError

# Stage 0 is left out: checkpoints, resume and the encoder export read ZeRO's partitioned files.
ZERO_STAGES = (1, 2, 3)


class DsConfigError(ConfigError):
    """A DeepSpeed JSON that cannot run; the message is one line naming the file and the fix.
    A ConfigError (so a ValueError): entry points print it and exit 2."""


def _positive_int(cfg: dict, key: str, path: str) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DsConfigError(f"{path}: {key} must be a whole number >= 1, got {value!r}")


def _complete_accumulation(cfg: dict, path: str, world_size: int) -> None:
    """Set gradient_accumulation_steps (default 1, or derived from train_batch_size as DeepSpeed
    does) and check that a train_batch_size in the file equals micro-batch x accumulation x world."""
    micro, given = cfg["train_micro_batch_size_per_gpu"], cfg.get("train_batch_size")
    if given is not None:
        _positive_int(cfg, "train_batch_size", path)
        if "gradient_accumulation_steps" not in cfg and given % (micro * world_size) == 0:
            cfg["gradient_accumulation_steps"] = given // (micro * world_size)
    cfg.setdefault("gradient_accumulation_steps", 1)
    _positive_int(cfg, "gradient_accumulation_steps", path)
    accum = cfg["gradient_accumulation_steps"]
    if given is not None and given != micro * accum * world_size:
        raise DsConfigError(f"{path}: train_batch_size {given} != micro-batch {micro} x gradient_accumulation_steps "
                            f"{accum} x {world_size} process(es) = {micro * accum * world_size}; remove "
                            f"train_batch_size (img2vec derives it) or make the three agree")


def load_ds_config(path: str, world_size: int, micro_batch: int = 0, accum_steps: int = 0) -> dict:
    """Read the DeepSpeed JSON, check it, resolve our "auto" precision, and complete the batch keys.

    `"bf16": {"enabled": "auto"}` means bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are
    slow on most CPUs, and fp32 keeps CPU runs bit-reproducible). The micro-batch and
    accumulation steps come from the file; train_batch_size is derived so that the three
    keys always agree for the world size we actually run with. micro_batch / accum_steps, when
    > 0, replace the file's (the run config's batch_size / accum_iter) before that. A file that sets
    train_batch_size must agree with them, or, without gradient_accumulation_steps, gets it
    derived as DeepSpeed does (train_batch_size / (micro-batch x world size)). Every problem
    raises DsConfigError with one line (never a traceback from inside DeepSpeed).
    """
    if not os.path.isfile(path):
        raise DsConfigError(f"DeepSpeed config not found: {path} (try configs/ds_zero2.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DsConfigError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DsConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise DsConfigError(f"{path} must hold a JSON object ({{\"train_micro_batch_size_per_gpu\": ...}}), "
                            f"not a {type(cfg).__name__}")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise DsConfigError(f"{path}: remove 'optimizer'/'scheduler'; img2vec builds AdamW and the "
                            f"LR schedule from its run config (base_lr, warmup_epochs, ...)")
    if "train_micro_batch_size_per_gpu" not in cfg:
        raise DsConfigError(f"{path} must set train_micro_batch_size_per_gpu (images per process per step)")
    if micro_batch:
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if accum_steps:
        cfg["gradient_accumulation_steps"] = accum_steps
    _positive_int(cfg, "train_micro_batch_size_per_gpu", path)
    _complete_accumulation(cfg, path, world_size)
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DsConfigError(f"{path}: zero_optimization must be an object like {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage == 0 and not isinstance(stage, bool):
        raise DsConfigError(f"{path}: ZeRO stage 0 (also DeepSpeed's default without a zero_optimization "
                            f"section) is not supported: img2vec's checkpoints, resume and encoder export "
                            f"read ZeRO's files; set \"zero_optimization\": {{\"stage\": 1}} (configs/ds_zero1.json)")
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise DsConfigError(f"{path}: zero_optimization.stage must be one of 1, 2, 3, got {stage!r}")
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
        raise DsConfigError(f"{path}: gradient_clipping must be a number >= 0 (0: off), got {clip!r}")
    for key in ("bf16", "fp16"):
        section = cfg.get(key)
        if section is not None and not isinstance(section, dict):
            raise DsConfigError(f"{path}: {key} must be an object like {{\"enabled\": \"auto\"}}, got {section!r}")
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = key == "bf16" and torch.cuda.is_available()
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    # We hand DeepSpeed a torch optimizer (no JIT-built DS op on CPU); ZeRO must accept it.
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def ds_precision(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
