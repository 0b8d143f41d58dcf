"""Fused masked feature loss: masked-row gather + per-row layer norm of the teacher
features + smooth-L1 + mean, forward and backward, in one Triton kernel each.

Contract: `kernels.reference.masked_feature_loss_ref`, to the letter. For every masked
row r = (b, m), with t = target[b, ids_masked[b, m], :] and p the matching pred row:

    mu    = mean_c t[c]            var = mean_c (t[c] - mu)^2           (fp32, biased)
    t_hat = (t - mu) * rstd        rstd = 1 / sqrt(var + eps)
    d     = p - t_hat
    l(d)  = 0.5 * d^2 / beta  if |d| < beta  else  |d| - 0.5 * beta
    loss  = sum_{b, m, c} l(d) / (B * M * C)                            (fp32 scalar)

pred is (B, N, C) (rows picked through ids_masked, exactly the reference's rule:
pred.shape[1] == N means "gather") or (B, M, C) already in masked order.

Bytes moved, R = B * M masked rows; P, T, I = bytes per element of pred, target, ids:
    reference (eager), forward + backward: gather copies of pred and target, their
        fp32 upcasts, the normalized target, smooth-L1 temporaries, and as many again
        in backward: about 10 passes of R * C elements.
    this kernel, forward:  R * C * (P + T)      + R * (I + 8)   read rows, write mean/rstd
                 backward: R * C * (P + T + P)  + R * (I + 8)   read rows + stats, write grad
                 (+ B * N * C * P for the zero fill when pred is (B, N, C))
    bf16 pred, fp32 target: 6 + 8 = 14 bytes per masked element for forward + backward.

Design choices:
  * One program owns BLOCK_M masked rows x all C columns. The row index goes through
    ids_masked straight into pred/target (no gathered copy). When C <= MAX_FUSED_C the
    whole (BLOCK_M, next_pow2(C)) tile sits in registers: one read of each input, stats
    and loss from registers. Wider rows loop over C in chunks (three passes over the
    target row: mean, variance, loss; the re-reads are L2 hits for one row).
  * Deterministic reduction: each program writes its partial sum to its own slot and the
    host sums the (num_programs,) buffer in a fixed order; no float atomics, so a repeat
    call is bitwise identical (for one tile config; GPU autotuning picks num_warps once
    per process and C, which can change the rounding between processes).
  * Saved for backward: per-row mean and rstd (8 bytes a row, < 1% of the row bytes for
    C >= 256). Recomputing them would cost nothing extra in bytes when the row fits in
    registers, but saving keeps t_hat bitwise identical between forward and backward and
    lets backward stream C in chunks in one pass, whatever C is.
  * Layout: (B, M, C) pred is the fast one for the trainer: the head runs on masked tokens
    only, and the gradient is B*M*C, written once. A (B, N, C) pred needs a zero-filled
    (B, N, C) gradient (B*N*C*P bytes more) that the kernel then scatters into.
  * Computing the gradient already in forward (and scaling by grad_out in backward) saves
    bytes only when target is wider than pred (and costs an in-place rescale pass); with
    bf16 teacher features it is a wash, so forward stays gradient-free.

ids_masked must hold distinct indices per batch row when pred is (B, N, C): the kernel
stores each masked row's gradient (the reference would sum duplicates).
"""
import torch
import triton
import triton.language as tl

# Rows wider than this are processed in chunks of CHUNK_C (three passes over target).
MAX_FUSED_C = 8192
CHUNK_C = 4096
# Elements per program tile: GPU tiles fit in registers; the CPU interpreter runs programs
# one after another with numpy, so it wants few, large ones.
TILE_ELEMS_GPU = 8192
TILE_ELEMS_INTERPRET = 1 << 17
# float64 is accepted because the reference accepts it; like the reference, math stays fp32
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _masked_rows(
    pid,        # program id: this program owns flat rows [pid * BLOCK_M, (pid + 1) * BLOCK_M)
    ids_ptr,    # (B, M) int32/int64 masked patch indices
    R,          # B * M masked rows
    M,          # masked patches per image
    stride_ib,  # ids_masked.stride(0)
    stride_im,  # ids_masked.stride(1)
    BLOCK_M: tl.constexpr,  # rows per program
):
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flat masked row b * M + m
    row_mask = rows < R
    b = (rows // M).to(tl.int64)
    m = (rows % M).to(tl.int64)
    n = tl.load(ids_ptr + b * stride_ib + m * stride_im, mask=row_mask, other=0).to(tl.int64)  # ids[b, m]
    return rows, row_mask, b, m, n


@triton.jit
def _smooth_l1(d, beta):
    ad = tl.abs(d)
    return tl.where(ad < beta, 0.5 * ad * ad / beta, ad - 0.5 * beta)


@triton.jit
def _fwd_kernel(
    pred_ptr,     # (B, N, C) or (B, M, C), fp32/bf16/fp16 (fp64), stride(-1) == 1
    target_ptr,   # (B, N, C), fp32/bf16/fp16 (fp64), stride(-1) == 1
    ids_ptr,      # (B, M) int32/int64, indices in [0, N)
    mean_ptr,     # (R,) fp32 out: mean of each masked target row
    rstd_ptr,     # (R,) fp32 out: 1 / sqrt(var + eps) of each masked target row
    partial_ptr,  # (num_programs,) fp32 out: sum of l(d) over this program's rows
    R,            # B * M masked rows
    M,            # masked patches per image
    C,            # channels
    stride_pb,    # pred.stride(0)
    stride_pn,    # pred.stride(1)
    stride_tb,    # target.stride(0)
    stride_tn,    # target.stride(1)
    stride_ib,    # ids_masked.stride(0)
    stride_im,    # ids_masked.stride(1)
    beta,         # smooth-L1 threshold, > 0
    eps,          # layer-norm epsilon
    PRED_GATHER: tl.constexpr,  # pred is (B, N, C)
    SINGLE_PASS: tl.constexpr,  # C <= BLOCK_C: the whole row tile stays in registers
    BLOCK_M: tl.constexpr,      # rows per program
    BLOCK_C: tl.constexpr,      # columns per tile (next_pow2(C), or the chunk width)
):
    pid = tl.program_id(0)
    rows, row_mask, b, m, n = _masked_rows(pid, ids_ptr, R, M, stride_ib, stride_im, BLOCK_M)
    t_off = b * stride_tb + n * stride_tn  # (BLOCK_M,) offset of target[b, ids[b, m], 0]
    if PRED_GATHER:
        p_off = b * stride_pb + n * stride_pn  # pred[b, ids[b, m], 0]
    else:
        p_off = b * stride_pb + m * stride_pn  # pred[b, m, 0]
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < C)[None, :]  # (BLOCK_M, BLOCK_C)
        # upcast right after the load: fp32 math always (and the CPU interpreter gets
        # bf16 arithmetic wrong)
        t = tl.load(target_ptr + t_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + p_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(t, axis=1) / C  # (BLOCK_M,)
        tc = tl.where(mask, t - mean[:, None], 0.0)
        var = tl.sum(tc * tc, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        d = p - tc * rstd[:, None]
        loss = tl.where(mask, _smooth_l1(d, beta), 0.0)
        acc = tl.sum(loss, axis=1)  # (BLOCK_M,)
    else:
        # pass 1: mean
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc < C)[None, :]
            t = tl.load(target_ptr + t_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            s += tl.sum(t, axis=1)
        mean = s / C
        # pass 2: variance about the mean (two-pass: no cancellation)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc < C)[None, :]
            t = tl.load(target_ptr + t_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            tc = tl.where(mask, t - mean[:, None], 0.0)
            s2 += tl.sum(tc * tc, axis=1)
        var = s2 / C
        rstd = 1.0 / tl.sqrt(var + eps)
        # pass 3: loss
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_mask[:, None] & (cc < C)[None, :]
            t = tl.load(target_ptr + t_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.load(pred_ptr + p_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            tc = tl.where(mask, t - mean[:, None], 0.0)
            d = p - tc * rstd[:, None]
            acc += tl.sum(tl.where(mask, _smooth_l1(d, beta), 0.0), axis=1)

    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


# Backward (vector-Jacobian product). With g the upstream scalar gradient and K = B*M*C:
#   loss = (1/K) sum l(d),  d = p - t_hat,  t_hat independent of p (target gets no grad)
#   dl/dd = d / beta        if |d| < beta
#         = sign(d)         if |d| >= beta      (= d / beta at |d| == beta: continuous)
#         = clamp(d / beta, -1, 1)
#   dloss/dp[r, c] = g / K * clamp(d[r, c] / beta, -1, 1)      for masked rows r
#   and 0 for the unmasked rows of a (B, N, C) pred (the host zero-fills them).
# t_hat is rebuilt from the saved mean/rstd with the forward's exact expression, so d is
# bitwise the forward's d. One pass: read pred and target rows, write grad rows.
@triton.jit
def _bwd_kernel(
    pred_ptr,      # (B, N, C) or (B, M, C), fp32/bf16/fp16 (fp64), stride(-1) == 1
    target_ptr,    # (B, N, C), fp32/bf16/fp16 (fp64), stride(-1) == 1
    ids_ptr,       # (B, M) int32/int64
    mean_ptr,      # (R,) fp32, saved by forward
    rstd_ptr,      # (R,) fp32, saved by forward
    grad_out_ptr,  # () fp32 upstream gradient of the scalar loss (read here: no host sync)
    grad_ptr,      # same layout as pred, pred's dtype, out; rows strided like grad_pred
    R,             # B * M masked rows
    M,             # masked patches per image
    C,             # channels
    stride_pb,     # pred.stride(0)
    stride_pn,     # pred.stride(1)
    stride_tb,     # target.stride(0)
    stride_tn,     # target.stride(1)
    stride_ib,     # ids_masked.stride(0)
    stride_im,     # ids_masked.stride(1)
    stride_gb,     # grad.stride(0)
    stride_gn,     # grad.stride(1)
    inv_numel,     # 1 / (B * M * C)
    beta,          # smooth-L1 threshold, > 0
    PRED_GATHER: tl.constexpr,  # pred is (B, N, C)
    BLOCK_M: tl.constexpr,      # rows per program
    BLOCK_C: tl.constexpr,      # columns per tile
):
    pid = tl.program_id(0)
    rows, row_mask, b, m, n = _masked_rows(pid, ids_ptr, R, M, stride_ib, stride_im, BLOCK_M)
    t_off = b * stride_tb + n * stride_tn  # (BLOCK_M,) offset of target[b, ids[b, m], 0]
    if PRED_GATHER:
        p_off = b * stride_pb + n * stride_pn  # pred[b, ids[b, m], 0]
        g_off = b * stride_gb + n * stride_gn  # grad[b, ids[b, m], 0]
    else:
        p_off = b * stride_pb + m * stride_pn  # pred[b, m, 0]
        g_off = b * stride_gb + m * stride_gn  # grad[b, m, 0]
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_out_ptr).to(tl.float32) * inv_numel
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        mask = row_mask[:, None] & (cc < C)[None, :]
        t = tl.load(target_ptr + t_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + p_off[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        tc = tl.where(mask, t - mean[:, None], 0.0)
        d = p - tc * rstd[:, None]
        dp = tl.where(d <= -beta, -g, tl.where(d >= beta, g, g * d / beta))
        tl.store(grad_ptr + g_off[:, None] + cc[None, :], dp.to(grad_ptr.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 `triton.jit` returns an interpreted function (numpy on CPU);
# it cannot autotune over several configs, so it runs one large-tile config.
INTERPRET = type(_fwd_kernel).__name__ == "InterpretedFunction"
if INTERPRET:
    _fwd, _bwd = _fwd_kernel, _bwd_kernel
else:
    # Tile shape is chosen on the host (it fixes the number of partial sums); only the
    # warps are tuned, once per C.
    _CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]
    _fwd = triton.autotune(configs=_CONFIGS, key=["C"])(_fwd_kernel)
    _bwd = triton.autotune(configs=_CONFIGS, key=["C"])(_bwd_kernel)


def _tiles(R: int, C: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_C, SINGLE_PASS) for R masked rows of C channels."""
    single = C <= MAX_FUSED_C
    block_c = max(16, triton.next_power_of_2(C)) if single else CHUNK_C
    tile = TILE_ELEMS_INTERPRET if INTERPRET else TILE_ELEMS_GPU
    block_m = max(1, min(tile // block_c, triton.next_power_of_2(max(R, 1))))
    return block_m, block_c, single


def _check_inputs(pred, target, ids_masked, beta):
    """Validate like the reference; returns (B, N, M, C, pred_gather)."""
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
        # checked on CPU only, where it costs no device sync; the reference's gather raises too
        raise IndexError(f"ids_masked out of range [0, {N})")
    return B, N, M, C, gather


def _fwd_launch(pred, target, ids_masked, beta, eps, gather):
    """Forward launcher. pred (B, N|M, C), target (B, N, C), ids (B, M) -> (loss, mean, rstd)."""
    B, N, C = target.shape
    M = ids_masked.shape[1]
    R = B * M
    assert pred.stride(-1) == 1 and target.stride(-1) == 1, "rows must be contiguous"
    assert pred.dtype in _FLOAT_DTYPES and target.dtype in _FLOAT_DTYPES
    assert ids_masked.dtype in (torch.int32, torch.int64) and ids_masked.shape == (B, M)
    assert pred.shape == ((B, N, C) if gather else (B, M, C))
    dev = pred.device
    mean = torch.empty(R, dtype=torch.float32, device=dev)  # (R,)
    rstd = torch.empty(R, dtype=torch.float32, device=dev)  # (R,)
    if R == 0:  # nothing masked: mean of nothing, like the reference
        return torch.full((), float("nan"), dtype=torch.float32, device=dev), mean, rstd
    block_m, block_c, single = _tiles(R, C)
    n_prog = triton.cdiv(R, block_m)
    partial = torch.empty(n_prog, dtype=torch.float32, device=dev)  # (num_programs,)
    _fwd[(n_prog,)](
        pred, target, ids_masked, mean, rstd, partial,
        R, M, C,
        pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1),
        ids_masked.stride(0), ids_masked.stride(1),
        float(beta), float(eps),
        PRED_GATHER=gather, SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    loss = partial.sum() / (R * C)  # fixed-order sum of the partials: deterministic
    return loss, mean, rstd


def _bwd_launch(grad_out, pred, target, ids_masked, mean, rstd, beta, gather):
    """Backward launcher: returns grad_pred, shaped and typed like pred."""
    B, N, C = target.shape
    M = ids_masked.shape[1]
    R = B * M
    assert pred.stride(-1) == 1 and target.stride(-1) == 1, "rows must be contiguous"
    assert mean.shape == rstd.shape == (R,) and mean.dtype == rstd.dtype == torch.float32
    assert grad_out.numel() == 1
    if gather:
        grad = torch.zeros(pred.shape, dtype=pred.dtype, device=pred.device)  # (B, N, C); masked rows overwritten
    else:
        grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)  # (B, M, C); every row written
    if R == 0:
        return grad.zero_()
    block_m, block_c, _ = _tiles(R, C)
    n_prog = triton.cdiv(R, block_m)
    _bwd[(n_prog,)](
        pred, target, ids_masked, mean, rstd, grad_out.reshape(()).float(), grad,
        R, M, C,
        pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1),
        ids_masked.stride(0), ids_masked.stride(1),
        grad.stride(0), grad.stride(1),
        1.0 / (R * C), float(beta),
        PRED_GATHER=gather, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return grad


class MaskedFeatureLossFunction(torch.autograd.Function):
    """autograd wrapper: forward saves (pred, target, ids, mean, rstd); target gets no grad."""

    @staticmethod
    def forward(ctx, pred, target, ids_masked, beta=2.0, eps=1e-6):
        _, _, _, _, gather = _check_inputs(pred, target, ids_masked, beta)
        # a strided last dim is copied once (the reference accepts any strides)
        pred = pred if pred.stride(-1) == 1 else pred.contiguous()
        target = target if target.stride(-1) == 1 else target.contiguous()
        loss, mean, rstd = _fwd_launch(pred, target, ids_masked, beta, eps, gather)
        ctx.save_for_backward(pred, target, ids_masked, mean, rstd)
        ctx.beta, ctx.gather = beta, gather
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pred, target, ids_masked, mean, rstd = ctx.saved_tensors
        grad = _bwd_launch(grad_out, pred, target, ids_masked, mean, rstd, ctx.beta, ctx.gather)
        return grad, None, None, None, None


def masked_feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ids_masked: torch.Tensor,
    beta: float = 2.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Img2Vec loss on masked patches, fused (same semantics as masked_feature_loss_ref).

    Args:
        pred:       (B, N, C) prediction for every patch, or (B, M, C) in ids_masked order
                    (the faster layout; told apart by pred.shape[1] like the reference).
        target:     (B, N, C) teacher features. Receives no gradient.
        ids_masked: (B, M) int64/int32 masked patch indices in [0, N), distinct per row.
        beta:       smooth-L1 threshold (> 0).
        eps:        added to the variance inside the square root.
    Returns:
        fp32 scalar; its gradient w.r.t. pred has pred's dtype.
    """
    return MaskedFeatureLossFunction.apply(pred, target, ids_masked, beta, eps)
