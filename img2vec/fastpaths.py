"""Resolve the `auto | <name>` switches of the fast paths to what can run here.

`auto` never fails: it picks the fastest path that runs and logs it. A path asked for by
name that cannot run fails with one line that says why and what to use instead.
"""
import functools
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("img2vec")


class FastPathError(RuntimeError):
    """A fast path asked for by name cannot run here; the message says why and what to use."""


def resolve_loss(loss_impl: str, device: torch.device, kind: str | None = None) -> tuple[str, Callable]:
    """Returns (name, fn) with fn(pred, target, ids_masked, beta, eps, kind="smooth_l1") -> fp32 scalar.

    kind ("smooth_l1" or "mse"), when given, is bound into fn: fn(pred, target, ids_masked, beta, eps).
    """
    from kernels.reference import masked_feature_loss_ref

    if kind is not None and kind not in ("smooth_l1", "mse"):
        raise ValueError(f"loss kind must be smooth_l1 or mse, got {kind!r}")
    name, fn = _resolve_loss_impl(loss_impl, device, masked_feature_loss_ref)
    return name, (fn if kind is None else functools.partial(fn, kind=kind))


def _resolve_loss_impl(loss_impl: str, device: torch.device, reference: Callable) -> tuple[str, Callable]:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if loss_impl == "reference" or (loss_impl == "auto" and device.type != "cuda"):
        return "reference", reference
    import kernels

    if not getattr(kernels, "TRITON_AVAILABLE", False):
        if loss_impl == "auto":
            log.info("loss: reference (triton is not importable)")
            return "reference", reference
        raise FastPathError("loss_impl=triton needs the triton package; use loss_impl=reference or auto")
    if device.type != "cuda" and not interpreted:
        raise FastPathError("loss_impl=triton needs a CUDA device (or TRITON_INTERPRET=1 for a slow CPU "
                           "check); use loss_impl=reference or auto")
    return "triton", kernels.masked_feature_loss


def resolve_attn(attn_impl: str, device: torch.device) -> str:
    """sdpa (flash / cuDNN / efficient kernels chosen by torch) unless asked otherwise."""
    if attn_impl == "auto":
        return "sdpa"
    if attn_impl == "xformers":
        try:
            import xformers.ops as xops

            q = torch.zeros(1, 4, 1, 64, device=device, dtype=torch.bfloat16)
            xops.memory_efficient_attention(q, q, q)  # its wheel may import yet fail here
        except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
            raise FastPathError(f"attn_impl=xformers cannot run here ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); use attn_impl=sdpa or auto") from None
    return attn_impl
