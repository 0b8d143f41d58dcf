"""Fused Triton kernels, one op per file, and their pure-PyTorch references.

`TRITON_AVAILABLE` says whether the Triton ops could be imported; without Triton the
reference still imports and the fused op raises one line that says what to use instead.
`TRITON_INTERPRETED` says whether they were built for Triton's CPU interpreter (the
TRITON_INTERPRET=1 environment variable, read once, when `kernels` is first imported).
"""
from .reference import masked_feature_loss_ref

try:
    from .masked_feature_loss import INTERPRET as TRITON_INTERPRETED
    from .masked_feature_loss import MaskedFeatureLossFunction, masked_feature_loss

    TRITON_AVAILABLE = True
except ImportError as _err:  # triton not installed (or broken): keep the reference usable
    TRITON_AVAILABLE = TRITON_INTERPRETED = False
    _TRITON_IMPORT_ERROR = _err
    MaskedFeatureLossFunction = None

    def masked_feature_loss(*args, **kwargs):
        raise RuntimeError(
            f"masked_feature_loss needs Triton, which failed to import ({_TRITON_IMPORT_ERROR}); "
            "use loss_impl=reference")


__all__ = [
    "TRITON_AVAILABLE", "TRITON_INTERPRETED", "MaskedFeatureLossFunction", "masked_feature_loss", "masked_feature_loss_ref",
]
