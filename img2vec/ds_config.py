"""The DeepSpeed JSON: read it, check it, resolve our "auto" precision, derive the batch keys."""
import json
import os

import torch

from img2vec.config import ConfigError

ZERO_STAGES = (0, 1, 2, 3)


class DsConfigError(ConfigError):
    """A DeepSpeed JSON that cannot run; the message is one line naming the file and the fix.
    A ConfigError (so a ValueError): entry points print it and exit 2."""


def _positive_int(cfg: dict, key: str, path: str) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DsConfigError(f"{path}: {key} must be a whole number >= 1, got {value!r}")


def load_ds_config(path: str, world_size: int) -> dict:
    """Read the DeepSpeed JSON, check it, resolve our "auto" precision, and complete the batch keys.

    `"bf16": {"enabled": "auto"}` means bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are
    slow on most CPUs, and fp32 keeps CPU runs bit-reproducible). The micro-batch and
    accumulation steps come from the file; train_batch_size is derived so that the three
    keys always agree for the world size we actually run with. Every problem raises
    DsConfigError with one line (never a traceback from inside DeepSpeed).
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
    cfg.setdefault("gradient_accumulation_steps", 1)
    _positive_int(cfg, "train_micro_batch_size_per_gpu", path)
    _positive_int(cfg, "gradient_accumulation_steps", path)
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DsConfigError(f"{path}: zero_optimization must be an object like {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise DsConfigError(f"{path}: zero_optimization.stage must be one of 0, 1, 2, 3, got {stage!r}")
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
