"""Pure-PyTorch references of every op in `kernels/`.

These are the contracts: each fast kernel must match its reference here, and tests and
benchmarks import the baseline from this file and nowhere else.
"""
import torch
import torch.nn.functional as F


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of x picked per batch element.

    x: (B, N, C), ids: (B, M) int64 in [0, N)  ->  (B, M, C)
    """
    B, M = ids.shape
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(B, M, x.shape[-1]))  # (B, M, C)


def masked_feature_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    ids_masked: torch.Tensor,
    beta: float = 2.0,
    eps: float = 1e-6,
    kind: str = "smooth_l1",
    math_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Img2Vec regression loss on masked patches (the contract of the fused kernel).

    Args:
        pred:       (B, N, C) student prediction for every patch, or (B, M, C) already
                    restricted to the masked patches in the order of `ids_masked`.
                    Told apart by pred.shape[1]: N = target.shape[1] means "gather",
                    M = ids_masked.shape[1] (< N) means "already masked order".
        target:     (B, N, C) teacher features for every patch, any strides and float dtype
                    (a channels_last (B, C, h, w) map viewed as `.flatten(2).transpose(1, 2)`
                    is read as it is). Receives no gradient.
        ids_masked: (B, M) int64 indices of the masked patches, each in [0, N).
        beta:       smooth-L1 threshold (> 0); dBOT / Img2Vec use 2.0.
        eps:        added to the variance inside the square root.
        kind:       "smooth_l1" (default, dBOT / Img2Vec) or "mse": mean squared error on
                    the layer-normed target (MAE's norm_pix_loss when target is pixels);
                    beta is not used by "mse".
        math_dtype: the precision of the math: fp32, the contract; float64 gives the
                    "truth" that low-precision parity tests measure errors against.

    Semantics, exactly:
        t      = target[b, ids_masked[b, m], :]                     (fp32)
        mu     = mean_c t[c];  var = mean_c (t[c] - mu)^2           (biased)
        t_hat  = (t - mu) / sqrt(var + eps)                         (layer norm, no affine)
        d      = pred[b, m, :] - t_hat                              (fp32)
        l(d)   = 0.5 * d^2 / beta      if |d| < beta       (kind "smooth_l1")
                 |d| - 0.5 * beta      otherwise
        l(d)   = d^2                                       (kind "mse")
        loss   = sum over b, m, c of l(d) / (B * M * C)             (fp32 scalar)

    Everything is computed in fp32 whatever the input dtypes (math_dtype); the result is a
    scalar of that dtype and the gradient w.r.t. pred has pred's dtype.

    Memory traffic (eager, per element of the masked rows; P = bytes of pred, T = of target):
    gather pred (read P, write P) + gather target (read T, write T) + upcasts (~8) +
    layer norm (read 4, write 4, plus stats) + smooth-L1 temporaries (~4 passes of 4 bytes)
    forward, and roughly as many passes again backward: about 10 full passes where a fused
    kernel needs 3 (read pred, read target, write grad).
    """
    if kind not in ("smooth_l1", "mse"):
        raise ValueError(f"kind must be one of ['mse', 'smooth_l1'], got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    B, N, C = target.shape
    M = ids_masked.shape[1]
    if ids_masked.shape[0] != B or pred.shape[0] != B:
        raise ValueError(f"batch sizes differ: pred {pred.shape[0]}, target {B}, ids_masked {ids_masked.shape[0]}")
    ids_masked = ids_masked.long()  # int32 ids are accepted, as by the kernel
    if pred.shape[1] == N:
        pred_m = gather_rows(pred, ids_masked)  # (B, M, C)
    elif pred.shape[1] == M:
        pred_m = pred  # (B, M, C), already in masked order
    else:
        raise ValueError(f"pred has {pred.shape[1]} tokens; expected N={N} (all patches) or M={M} (masked only)")
    if pred_m.shape != (B, M, C):
        raise ValueError(f"pred {tuple(pred.shape)} does not match target {tuple(target.shape)}")

    target_m = gather_rows(target.detach(), ids_masked).to(math_dtype)  # (B, M, C)
    target_hat = F.layer_norm(target_m, (C,), eps=eps)  # (B, M, C), biased var, no affine
    if kind == "mse":
        return F.mse_loss(pred_m.to(math_dtype), target_hat, reduction="mean")
    return F.smooth_l1_loss(pred_m.to(math_dtype), target_hat, reduction="mean", beta=beta)
