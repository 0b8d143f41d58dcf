"""DeepSpeed plumbing for train.py: process group, DeepSpeed JSON, optimizer, LR/WD schedule."""
import json
import logging
import math
import os
import random
import signal

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("img2vec")


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_rank).

    Under the `deepspeed` launcher or torchrun the environment is already set; a plain
    `python img2vec/train.py` run becomes a one-process group on localhost. MPI discovery
    is off: without it DeepSpeed would look for mpi4py when RANK is missing.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, cls/mask tokens (MAE); frozen params out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    fused_optim: str) -> torch.optim.Optimizer:
    """AdamW. `auto` and `torch`: torch's fused AdamW (CUDA and CPU), whose `found_inf` lets
    the trainer skip a non-finite step on the device, with no host sync. `apex`: NVIDIA apex
    FusedAdam, when asked for by name (it has no device-side skip)."""
    groups = param_groups(model, weight_decay)
    if fused_optim == "apex":
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex; PyPI's `apex` is unrelated
        except ImportError:
            FusedAdam = None
        if FusedAdam is None or not torch.cuda.is_available():
            raise RuntimeError("fused_optim=apex needs NVIDIA apex built with CUDA (see README); "
                               "use fused_optim=torch or auto")
        log.info("optimizer: apex FusedAdam (non-finite steps are not skipped on the device)")
        return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
    log.info("optimizer: torch fused AdamW")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def skip_step_if(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """Make the next optimizer.step() a no-op when `nonfinite` (a device scalar) is > 0.

    torch's fused AdamW reads `found_inf` inside its kernel (the mechanism GradScaler uses):
    no parameter, moment or step count changes, and the host never waits for the flag.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (nonfinite > 0).float()


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (a host sync: call it rarely)."""
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


class GracefulStop:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and exit 0. Second: exit at once."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then checkpointing (send it again to exit now)",
                    self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warmup to `peak` (step 0 already moves), then half-cosine from `peak` to `final`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay
