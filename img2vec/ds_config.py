"""The DeepSpeed JSON: read it, resolve our "auto" precision, derive the batch keys."""
import json
import os

import torch


def load_ds_config(path: str, world_size: int) -> dict:
    """Read the DeepSpeed JSON, resolve our "auto" precision, and complete the batch keys.

    `"bf16": {"enabled": "auto"}` means bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are
    slow on most CPUs, and fp32 keeps CPU runs bit-reproducible). The micro-batch and
    accumulation steps come from the file; train_batch_size is derived so that the three
    keys always agree for the world size we actually run with.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config not found: {path} (try configs/ds_zero2.json)")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if "train_micro_batch_size_per_gpu" not in cfg:
        raise ValueError(f"{path} must set train_micro_batch_size_per_gpu (images per process per step)")
    for key in ("bf16", "fp16"):
        section = cfg.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = key == "bf16" and torch.cuda.is_available()
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    # We hand DeepSpeed a torch optimizer (no JIT-built DS op on CPU); ZeRO must accept it.
    cfg["zero_allow_untested_optimizer"] = True
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(f"{path}: remove 'optimizer'/'scheduler'; img2vec builds AdamW and the "
                         f"LR schedule from its run config (base_lr, warmup_epochs, ...)")
    return cfg


def ds_precision(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
