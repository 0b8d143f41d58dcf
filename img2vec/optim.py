"""AdamW with MAE's parameter groups, the device-side step skip, and the LR / weight-decay schedule."""
import logging
import math

import torch
import torch.nn as nn

from img2vec.fastpaths import FastPathError

log = logging.getLogger("img2vec")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, cls/mask tokens; frozen params out.

    MAE's pretraining decays its (1, 1, D) cls and mask tokens (it exempts 1-D parameters only);
    we exempt them as timm, DeiT, BEiT and MAE's own fine-tuning do (docs/recipes.md)."""
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
            raise FastPathError("fused_optim=apex needs NVIDIA apex built with CUDA (see README); "
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


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warmup to `peak` (step 0 already moves), then half-cosine from `peak` to `final`.

    MAE's lr_sched runs its first step at lr 0: each warmup step here gets MAE's lr of the next
    step; after warmup the two are equal (docs/recipes.md)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_outlasts_run(total_steps: int, warmup_steps: int, peak: float) -> str | None:
    """A warning line when the warm-up is longer than the run, so the LR never reaches `peak`; else None."""
    if warmup_steps <= total_steps:
        return None
    top = cosine_schedule(total_steps - 1, total_steps, warmup_steps, peak, 0.0)
    return (f"the LR warm-up ({warmup_steps} steps) is longer than the run ({total_steps} steps): the LR stops at "
            f"{top:.2e}, short of its peak {peak:.2e}; lower warmup_epochs or run more steps")


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay
