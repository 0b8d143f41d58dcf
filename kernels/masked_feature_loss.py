"""Fused masked feature loss: masked-row gather + per-row layer norm of the teacher
features + smooth-L1 (or squared error) + mean, and the gradient, in ONE Triton kernel.

Contract: `kernels.reference.masked_feature_loss_ref`, to the letter. For every masked
row r = (b, m), with t = target[b, ids_masked[b, m], :] and p the matching pred row:

    mu    = mean_c t[c]            var = mean_c (t[c] - mu)^2           (fp32, biased)
    t_hat = (t - mu) * rstd        rstd = 1 / sqrt(var + eps)
    d     = p - t_hat
    kind "smooth_l1": l(d) = 0.5 * d^2 / beta  if |d| < beta  else  |d| - 0.5 * beta
    kind "mse":       l(d) = d^2      (MAE's norm_pix_loss when target is pixels)
    loss  = sum_{b, m, c} l(d) / K,    K = B * M * C                   (fp32 scalar)

pred is (B, N, C) (rows picked through ids_masked, exactly the reference's rule:
pred.shape[1] == N means "gather") or (B, M, C) already in masked order. target is any
strided (B, N, C) view, fp32/bf16/fp16: a channels_last (B, C, h, w) teacher map viewed as
`fmap.flatten(2).transpose(1, 2)` is read where it lies, no copy.

The gradient is computed in forward (it needs only what forward already has in registers)
and stored pre-scaled by 1/K, in pred's dtype and shape:

    dloss/dp[r, c] = g / K * clamp(d / beta, -1, 1)     smooth_l1   (g = upstream grad)
                   = g / K * 2 * d                      mse
    and 0 for the unmasked rows of a (B, N, C) pred (zero-filled by the host).

Backward then only multiplies by g, and only when g != 1: a tiny kernel reads g on the
device and every program exits at once when g == 1 (no host sync, no pass over the grad).

Bytes per masked element, counted from the loads and stores below (P, T bytes of pred and
target, I of ids, R = B * M rows):
    forward:  read pred P + read target T + write grad P          = 2P + T per element
              + I per row (ids) + 4 B per row (the row's loss sum, summed by the host)
    backward: 0 when g == 1 (the trainer's case); 2P per element of the grad otherwise
    + B * N * C * P for the zero fill when pred is (B, N, C) (its unmasked rows).
    No per-row stats are saved: nothing in backward needs them.
    bf16 pred, fp32 target: 2*2 + 4 = 8 B per element; bf16 target: 6 B.
    (A backward that recomputed d would read pred and target again: 3P + 2T = 14 B.)

Design choices:
  * One program owns BLOCK_M masked rows and walks them in BLOCK_C = 256-wide column
    chunks: C = 768, 1024, 1280, 2048 are 3, 4, 5, 8 whole chunks, so every warp loads a
    full chunk each step (a power-of-two tile of next_pow2(C) columns would leave 25% of the
    warps idle at C = 768 and 37.5% at 1280).
  * Two passes over the chunks: pass 1 reads target and merges per-chunk (mean, M2)
    pairs (Chan et al.: as stable as two-pass, one read); pass 2 reads pred and target and
    writes the grad. The second read of target is meant to hit L2 (the program read those
    BLOCK_M * C * T bytes a moment before), so that HBM sees target once; the benchmark's
    % of the 2P + T bound is what tells whether it does on a given GPU.
  * Deterministic: each row's loss sum goes to its own slot and the host sums the (R,)
    buffer in a fixed order; no float atomics, so a repeat call is bitwise identical. The
    row split (BLOCK_M) cannot change the result; the in-row reduction order follows the
    layout of the autotuned config, picked once per process and key.
  * Memory: the stored gradient (R * C * P bytes, pred's size) lives from forward to
    backward, as pred itself does.
  * ids_masked bounds: a row whose index is outside [0, N) is not read (masked load) and
    poisons its loss and gradient with NaN, so an out-of-range id surfaces as a NaN loss at
    the next log line, without a host sync. On CPU (interpreter) the host checks and raises
    IndexError like the reference.

ids_masked must hold distinct indices per batch row when pred is (B, N, C): the kernel
stores each masked row's gradient (the reference would sum duplicates).
"""
import torch
import triton
import triton.language as tl

KINDS = {"smooth_l1": 0, "mse": 1}
# GPU column chunk: 256 bf16 = one warp's 128-bit loads (8 elements x 32 lanes)
BLOCK_C_GPU = 256
# The CPU interpreter runs programs one after another with numpy: few, large tiles.
BLOCK_C_INTERPRET = 2048
TILE_ELEMS_INTERPRET = 1 << 17
SCALE_BLOCK = 4096  # elements per program of the backward's rescale
# float64 is accepted because the reference accepts it; like the reference, math stays fp32
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _fwd_kernel(
    pred_ptr,     # (B, N, C) or (B, M, C), fp32/bf16/fp16 (fp64), stride(-1) == 1
    target_ptr,   # (B, N, C) any strides, fp32/bf16/fp16 (fp64)
    ids_ptr,      # (B, M) int32/int64, indices in [0, N)
    grad_ptr,     # like pred, pred's dtype, contiguous, out: dloss/dpred for g = 1
    row_loss_ptr,  # (R,) fp32 out: sum_c l(d) of each masked row
    R,            # B * M masked rows
    M,            # masked patches per image
    N,            # patches per image (bounds of ids_masked)
    C,            # channels
    stride_pb,    # pred.stride(0)
    stride_pn,    # pred.stride(1)
    stride_tb,    # target.stride(0)
    stride_tn,    # target.stride(1)
    stride_tc,    # target.stride(2) (1 is specialized by Triton: 128-bit loads)
    stride_ib,    # ids_masked.stride(0)
    stride_im,    # ids_masked.stride(1)
    stride_gb,    # grad.stride(0)
    stride_gn,    # grad.stride(1)
    beta,         # smooth-L1 threshold, > 0
    eps,          # layer-norm epsilon
    inv_numel,    # 1 / (B * M * C)
    PRED_GATHER: tl.constexpr,  # pred is (B, N, C): its rows go through ids_masked
    KIND: tl.constexpr,         # 0 smooth_l1, 1 mse
    WRITE_GRAD: tl.constexpr,   # pred requires grad
    BLOCK_C: tl.constexpr,      # columns per chunk
    BLOCK_M: tl.constexpr,      # rows per program (autotuned on GPU)
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flat masked row b * M + m
    row_mask = rows < R
    b = (rows // M).to(tl.int64)
    m = (rows % M).to(tl.int64)
    n = tl.load(ids_ptr + b * stride_ib + m * stride_im, mask=row_mask, other=0).to(tl.int64)  # ids[b, m]
    bad = row_mask & ((n < 0) | (n >= N))  # out-of-range id: never dereferenced, loss NaN
    ok = row_mask & (n >= 0) & (n < N)
    t_off = b * stride_tb + n * stride_tn  # (BLOCK_M,) offset of target[b, ids[b, m], 0]
    if PRED_GATHER:
        p_off = b * stride_pb + n * stride_pn  # pred[b, ids[b, m], 0]
        g_off = b * stride_gb + n * stride_gn
    else:
        p_off = b * stride_pb + m * stride_pn  # pred[b, m, 0]
        g_off = b * stride_gb + m * stride_gn
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

    # pass 1: row mean and M2 = sum (t - mean)^2, merged chunk by chunk (Chan et al.):
    # each chunk's own two-pass stats, then mean += delta * nk / n', M2 += M2_k + delta^2 * n * nk / n'
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        mask = ok[:, None] & (cc < C)[None, :]  # (BLOCK_M, BLOCK_C)
        # upcast right after the load: fp32 math always (the interpreter gets bf16 math wrong)
        t = tl.load(target_ptr + t_off[:, None] + cc[None, :] * stride_tc, mask=mask, other=0.0).to(tl.float32)
        nk = tl.minimum(C - c0, BLOCK_C) * 1.0  # valid columns in this chunk (fp32)
        seen = c0 * 1.0  # columns merged so far
        k_mean = tl.sum(t, axis=1) / nk
        tk = tl.where(mask, t - k_mean[:, None], 0.0)
        delta = k_mean - mean
        mean = mean + delta * (nk / (seen + nk))
        m2 = m2 + tl.sum(tk * tk, axis=1) + delta * delta * (seen * nk / (seen + nk))
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    # a bad row's loss and gradient are NaN (a flag read at log time, no host sync)
    row_scale = tl.where(bad, float("nan"), inv_numel)  # (BLOCK_M,)

    # pass 2: loss and gradient; target's second read is an L2 hit
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        cmask = (cc < C)[None, :]
        mask = row_mask[:, None] & cmask
        t = tl.load(target_ptr + t_off[:, None] + cc[None, :] * stride_tc,
                    mask=ok[:, None] & cmask, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + p_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        d = p - (t - mean[:, None]) * rstd[:, None]
        if KIND == 0:
            ad = tl.abs(d)
            loss = tl.where(ad < beta, 0.5 * ad * ad / beta, ad - 0.5 * beta)
            dl = tl.minimum(tl.maximum(d / beta, -1.0), 1.0)  # d l / d d, continuous at |d| == beta
        else:
            loss = d * d
            dl = 2.0 * d
        acc += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        if WRITE_GRAD:
            grad = dl * row_scale[:, None]
            tl.store(grad_ptr + g_off[:, None] + cc[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
    acc = tl.where(bad, float("nan"), acc)
    tl.store(row_loss_ptr + rows, acc, mask=row_mask)


# Backward (vector-Jacobian product): the stored gradient is dloss/dpred at g = 1, so the
# VJP is g * grad. The trainer's g is 1 (the loss is the root of backward): every program
# reads g and exits; otherwise grad *= g in place, one read and one write of the buffer.
@triton.jit
def _scale_kernel(
    grad_ptr,      # (numel,) the stored gradient, contiguous, pred's dtype; scaled in place
    grad_out_ptr,  # () fp32 upstream gradient of the scalar loss (read here: no host sync)
    numel,         # elements of grad
    BLOCK: tl.constexpr,  # elements per program
):
    g = tl.load(grad_out_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 `triton.jit` returns an interpreted function (numpy on CPU);
# it cannot autotune over several configs, so it runs one large-tile config.
INTERPRET = type(_fwd_kernel).__name__ == "InterpretedFunction"
# (BLOCK_M, num_warps): BLOCK_M >= num_warps so that every warp owns at least one row of the
# (BLOCK_M, 256) chunk; at most 8 warps, so that several blocks fit on an SM (16 warps at ~80
# registers fit one). tests/test_compile_sm90.py compiles each of them for sm_90.
FWD_CONFIGS = ((4, 4), (8, 4), (8, 8), (16, 8))
SCALE_WARPS = 4
# Everything that changes the best config is in the key (Triton adds the argument dtypes).
FWD_KEY = ["R", "C", "stride_tc", "PRED_GATHER", "KIND", "WRITE_GRAD", "BLOCK_C"]
if INTERPRET:
    _fwd = _fwd_kernel
else:
    _fwd = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in FWD_CONFIGS], key=FWD_KEY,
    )(_fwd_kernel)


def _block_c(C: int, interpret: bool) -> int:
    """Column chunk: 256 on GPU (next_pow2(C) below that); the interpreter's is wide."""
    if interpret:
        return max(16, min(triton.next_power_of_2(C), BLOCK_C_INTERPRET))
    return max(16, min(triton.next_power_of_2(C), BLOCK_C_GPU))


def _check_inputs(pred, target, ids_masked, beta, kind):
    """Validate like the reference; returns (B, N, M, C, pred_gather)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if target.dim() != 3 or pred.dim() != 3 or ids_masked.dim() != 2:
        raise ValueError(
            f"expected pred (B, N|M, C), target (B, N, C), ids_masked (B, M); got "
            f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(ids_masked.shape)}")
    B, N, C = target.shape
    M = ids_masked.shape[1]
    if ids_masked.shape[0] != B:
        raise ValueError(f"ids_masked has batch {ids_masked.shape[0]}, target has {B}")
    if pred.shape[1] == N:
        gather = True
    elif pred.shape[1] == M:
        gather = False
    else:
        raise ValueError(f"pred has {pred.shape[1]} tokens; expected N={N} (all patches) or M={M} (masked only)")
    if pred.shape[0] != B or pred.shape[2] != C:
        raise ValueError(f"pred {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    for name, x in (("pred", pred), ("target", target)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {x.dtype} not supported: use float32, bfloat16 or float16 (or float64)")
    if ids_masked.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids_masked dtype {ids_masked.dtype} not supported: use int64 or int32")
    if not (pred.device == target.device == ids_masked.device):
        raise ValueError(f"pred, target, ids_masked on {pred.device}, {target.device}, {ids_masked.device}: "
                         "move them to one device")
    if pred.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"masked_feature_loss (Triton) got {pred.device} tensors: it needs CUDA, or TRITON_INTERPRET=1 "
            "set before `kernels` is first imported (slow, for tests); use loss_impl=reference on CPU")
    if ids_masked.device.type == "cpu" and ids_masked.numel() and (
            int(ids_masked.min()) < 0 or int(ids_masked.max()) >= N):
        # checked on CPU only, where it costs no device sync (CUDA: NaN loss, see the docstring)
        raise IndexError(f"ids_masked out of range [0, {N})")
    return B, N, M, C, gather


def fwd_launch_args(pred, target, ids_masked, beta, eps, kind, write_grad, gather, interpret=None):
    """(grid, args, constexprs, grad, row_loss) of one forward launch, allocations included.

    The single source of the forward's arguments: `_fwd_launch` runs it, and
    tests/test_compile_sm90.py builds the sm_90 compile of each autotune config from it
    (interpret=False: the GPU's choices, whatever this process runs; meta tensors work).
    On GPU, BLOCK_M and num_warps come from the autotune config (FWD_CONFIGS).
    """
    interpret = INTERPRET if interpret is None else interpret
    B, N, C = target.shape
    M = ids_masked.shape[1]
    R = B * M
    assert pred.stride(-1) == 1, "pred rows must be contiguous"
    assert pred.dtype in _FLOAT_DTYPES and target.dtype in _FLOAT_DTYPES
    assert ids_masked.dtype in (torch.int32, torch.int64) and ids_masked.shape == (B, M)
    assert pred.shape == ((B, N, C) if gather else (B, M, C))
    dev = pred.device
    if not write_grad:
        grad = torch.empty(0, dtype=pred.dtype, device=dev)  # never stored to
        stride_gb = stride_gn = 0
    else:
        # (B, N, C): unmasked rows keep their zero; (B, M, C): every row is written
        grad = (torch.zeros if gather else torch.empty)(pred.shape, dtype=pred.dtype, device=dev)
        stride_gb, stride_gn = grad.stride(0), grad.stride(1)
    row_loss = torch.empty(R, dtype=torch.float32, device=dev)  # (R,)
    args = [
        pred, target, ids_masked, grad, row_loss,
        R, M, N, C,
        pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1), target.stride(2),
        ids_masked.stride(0), ids_masked.stride(1),
        stride_gb, stride_gn,
        float(beta), float(eps), 1.0 / max(R * C, 1),
    ]
    constexprs = {"PRED_GATHER": gather, "KIND": KINDS[kind], "WRITE_GRAD": write_grad,
                  "BLOCK_C": _block_c(C, interpret)}
    if interpret:
        constexprs["BLOCK_M"] = max(1, min(TILE_ELEMS_INTERPRET // constexprs["BLOCK_C"],
                                           triton.next_power_of_2(max(R, 1))))
        grid = (triton.cdiv(R, constexprs["BLOCK_M"]),)
    else:
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
    return grid, args, constexprs, grad, row_loss


def _fwd_launch(pred, target, ids_masked, beta, eps, kind, write_grad, gather):
    """Forward: pred (B, N|M, C), target (B, N, C), ids (B, M) -> (loss, grad or None)."""
    grid, args, constexprs, grad, row_loss = fwd_launch_args(
        pred, target, ids_masked, beta, eps, kind, write_grad, gather)
    if row_loss.numel() == 0:  # nothing masked: mean of nothing, like the reference
        loss = torch.full((), float("nan"), dtype=torch.float32, device=pred.device)
        return loss, (grad if write_grad else None)
    _fwd[grid](*args, **constexprs)
    loss = row_loss.sum() / (row_loss.numel() * pred.shape[-1])  # fixed-order sum: deterministic
    return loss, (grad if write_grad else None)


def scale_launch_args(grad, grad_out):
    """(grid, args, constexprs, num_warps) of the backward's rescale of `grad` by `grad_out`."""
    assert grad.is_contiguous() and grad_out.numel() == 1
    numel = grad.numel()
    grid = (max(1, triton.cdiv(numel, SCALE_BLOCK)),)
    return grid, [grad, grad_out.reshape(()).float(), numel], {"BLOCK": SCALE_BLOCK}, SCALE_WARPS


def _scale_launch(grad, grad_out):
    """grad *= grad_out in place, decided on the device (nothing happens when it is 1)."""
    if grad.numel() == 0:
        return grad
    grid, args, constexprs, num_warps = scale_launch_args(grad, grad_out)
    if INTERPRET:
        _scale_kernel[grid](*args, **constexprs)
    else:
        _scale_kernel[grid](*args, **constexprs, num_warps=num_warps)
    return grad


class MaskedFeatureLossFunction(torch.autograd.Function):
    """autograd wrapper: forward computes the loss and stores dloss/dpred; target gets no grad.

    The stored gradient is handed over (not copied) to the first backward. A second
    backward through the same graph (retain_graph=True, gradcheck) recomputes it.
    """

    @staticmethod
    def forward(ctx, pred, target, ids_masked, beta=2.0, eps=1e-6, kind="smooth_l1", write_grad=True):
        _, _, _, _, gather = _check_inputs(pred, target, ids_masked, beta, kind)
        pred = pred if pred.stride(-1) == 1 else pred.contiguous()  # a strided channel dim is copied once
        loss, grad = _fwd_launch(pred, target, ids_masked, beta, eps, kind, write_grad, gather)
        # an attribute, not save_for_backward: backward gives the buffer away, so autograd
        # can take it as pred.grad without a clone. The inputs are saved (no copy, they are
        # alive anyway) only for a second backward.
        ctx.grad = grad
        ctx.save_for_backward(pred, target, ids_masked)
        ctx.args = (beta, eps, kind, gather)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        if grad is None:  # the first backward took the stored gradient: compute it again
            pred, target, ids_masked = ctx.saved_tensors
            beta, eps, kind, gather = ctx.args
            _, grad = _fwd_launch(pred, target, ids_masked, beta, eps, kind, True, gather)
        return _scale_launch(grad, grad_out), None, None, None, None, None, None


def masked_feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ids_masked: torch.Tensor,
    beta: float = 2.0,
    eps: float = 1e-6,
    kind: str = "smooth_l1",
) -> torch.Tensor:
    """Img2Vec loss on masked patches, fused (same semantics as masked_feature_loss_ref).

    Args:
        pred:       (B, N, C) prediction for every patch, or (B, M, C) in ids_masked order
                    (the faster layout; told apart by pred.shape[1] like the reference).
        target:     (B, N, C) teacher features, any strides, fp32/bf16/fp16 (e.g. a
                    channels_last (B, C, h, w) map as `.flatten(2).transpose(1, 2)`).
                    Receives no gradient.
        ids_masked: (B, M) int64/int32 masked patch indices in [0, N), distinct per row.
                    On CUDA an out-of-range index makes the loss NaN (not an exception).
        beta:       smooth-L1 threshold (> 0); unused by "mse".
        eps:        added to the variance inside the square root.
        kind:       "smooth_l1" (dBOT / Img2Vec) or "mse" (MAE's norm_pix_loss).
    Returns:
        fp32 scalar; its gradient w.r.t. pred has pred's dtype (computed in forward).
    """
    write_grad = pred.requires_grad and torch.is_grad_enabled()
    return MaskedFeatureLossFunction.apply(pred, target, ids_masked, beta, eps, kind, write_grad)
