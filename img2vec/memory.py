"""Per-GPU memory estimate for Img2Vec pretraining under DeepSpeed ZeRO: model states + activations.

    python -m img2vec.memory --model vit_huge --zero_stage 3 --num_gpus 8 --batch_size 64 [--grad_ckpt [K]]
        [--image_size 224] [--mask_ratio 0.75] [--teacher resnet50|hog|pixels] [--offload_optimizer]

Model states: the ZeRO paper's 16 bytes/param rule (bf16 params and grads, fp32 master and
Adam m, v), sharded by stage; DeepSpeed's own estimator is reported beside it. Activations:
what autograd keeps per transformer block (Korthikanti et al. 2022 without dropout terms),
checked term by term against saved tensors in tests/test_memory.py. The derivation of every
term, and why DeepSpeed's estimator differs, is in docs/memory.md.
"""
import argparse
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from img2vec.masking import num_visible
from img2vec.vit import VIT_SIZES, build_student

GiB = 2**30
H100_BYTES = 81559 * 2**20  # what an "80 GB" H100 / A100 reports (nvidia-smi: 81559 MiB)
HEADROOM = 0.90  # of device memory usable by tensors: context, NCCL, fragmentation take the rest
DS_BUCKET = 50_000_000  # reduce / prefetch bucket elements in configs/ds_zero*.json


# ---------------------------------------------------------------------------------------------
# Model states
# ---------------------------------------------------------------------------------------------

def model_state_bytes(params: int, zero: int, gpus: int, offload_optimizer: bool = False,
                      precision: str = "bf16") -> dict:
    """Per-GPU bytes of params, grads and optimizer states under ZeRO-`zero` over `gpus` GPUs.

    bf16: 2 + 2 + 12 (fp32 master + Adam m, v); fp32: 4 + 4 + 8 (Adam m, v). Both 16/param.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {zero}")
    if offload_optimizer and zero < 2:
        raise ValueError("--offload_optimizer needs ZeRO-2 or 3 (DeepSpeed offloads from those stages)")
    w, g, o = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    shard = lambda nbytes, from_stage: params * nbytes / (gpus if zero >= from_stage else 1)  # noqa: E731
    out = {"params": shard(w, 3), "grads": shard(g, 2), "optimizer": shard(o, 1)}
    if offload_optimizer:
        out["optimizer_on_cpu"] = out.pop("optimizer")
        out["optimizer"] = 0.0
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def deepspeed_model_states(params: int, largest_layer: int, zero: int, gpus: int,
                           offload_optimizer: bool = False) -> float:
    """Per-GPU model-state bytes from DeepSpeed's own estimator (the numbers `*_all_cold` prints).

    ZeRO-1 uses DeepSpeed's stage-1-and-2 estimator (it has no stage-1 one); ZeRO-3 keeps the
    parameters on the GPU (offload_param off), zero_init on.
    """
    if zero in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, num_nodes=1,
                                                       cpu_offload=offload_optimizer)
        return float(gpu)
    if zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=gpus,
                                                          num_nodes=1, cpu_offload=offload_optimizer,
                                                          cpu_offload_params=False, zero_init=True)
        return float(gpu)
    raise ValueError("DeepSpeed has model-state estimators for ZeRO-1/2/3 only")


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def block_activation_bytes(batch: int, tokens: int, width: int, heads: int, elem: int, attn: str) -> int:
    """kept(T, D, H): bytes autograd keeps for one pre-norm ViT block (formula in the module doc)."""
    B, T, D, H, e = batch, tokens, width, heads, elem
    attn_term = e * B * H * T * T if attn == "math" else 4 * B * H * T
    if attn == "math" and (B == 1 or H == 1):  # k, v fold into bmm as views: the qkv buffer stays
        attn_term += e * B * T * D
    return B * T * (16 * e * D + 16) + attn_term


@dataclass
class Shapes:
    """What the estimate needs of the student and teacher; built on the meta device."""
    model: str
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    num_patches: int  # N
    visible: int  # V
    channels: int  # C, teacher
    params: int  # student, all parameters (DeepSpeed partitions frozen ones too)
    largest_layer: int  # the most parameters one module holds directly (DeepSpeed's L)
    teacher_params: int
    # per image: {"elements": n} at the run's precision, or {"fp32_elements": n} (pixels, hog: fp32)
    teacher_peak_per_image: dict = field(default_factory=dict)

    @property
    def masked(self) -> int:
        return self.num_patches - self.visible


def _largest_layer(model: nn.Module) -> int:
    # DeepSpeed's model_to_params, without its data_ptr() dedup (all 0 on the meta device)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _teacher_peak_per_image(teacher: nn.Module, image_size: int) -> int:
    """Elements alive at the teacher's forward peak, per image: max over leaf modules of
    input + output, plus the largest input any container (a residual block) holds meanwhile."""
    leaf, container = [0], [0]

    def hook(module, inputs, output):
        n_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        outs = output if isinstance(output, (list, tuple)) else [output]
        n_out = sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        if next(module.children(), None) is None:
            leaf[0] = max(leaf[0], n_in + n_out)
        elif module is not teacher.backbone:
            container[0] = max(container[0], n_in)

    handles = [m.register_forward_hook(hook) for m in teacher.backbone.modules()]
    try:
        teacher(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return leaf[0] + container[0]


def model_shapes(model: str, image_size: int = 224, patch_size: int = 0, mask_ratio: float = 0.75,
                 decoder_depth: int = 8, decoder_width: int = 512, decoder_heads: int = 16,
                 teacher: str = "resnet50", teacher_stage: "int | str" = 3) -> Shapes:
    """Build student and teacher on the meta device (no memory, ~1 s) and read their shapes."""
    import logging

    from img2vec.hog import WEIGHT_FREE_TEACHERS, peak_elements_per_image
    from img2vec.teacher import build_teacher

    size = VIT_SIZES[model]
    p = patch_size or size.patch_size
    tlog = logging.getLogger("img2vec.teacher")
    level, tlog.level = tlog.level, logging.ERROR  # "weights are random": irrelevant for a count
    try:
        with torch.device("meta"):
            t = build_teacher(teacher, teacher_stage, "random", p, image_size)
            s = build_student(model, image_size, p, t.channels, decoder_depth, decoder_width, decoder_heads)
    finally:
        tlog.level = level
    n = (image_size // p) ** 2
    return Shapes(model, image_size, p, size.width, size.depth, size.heads, decoder_width, decoder_depth,
                  decoder_heads, n, num_visible(n, mask_ratio), t.channels,
                  sum(q.numel() for q in s.parameters()), _largest_layer(s),
                  sum(q.numel() for q in t.parameters()),
                  {"fp32_elements": peak_elements_per_image(teacher, image_size, p)} if teacher in
                  WEIGHT_FREE_TEACHERS else {"elements": _teacher_peak_per_image(t, image_size)})


def backward_work_bytes(batch: int, tokens: int, width: int, heads: int, elem: int, attn: str) -> int:
    """Extra bytes while one block runs backward, over what it keeps (module doc)."""
    B, T, D, H, e = batch, tokens, width, heads, elem
    per_token = 5 * D  # grad of the block output (1) + grad of the fc2 input (4)
    if attn == "math":  # softmax grads in and out (2*H*T), its MLP + proj inputs already freed (11*D)
        per_token = max(per_token, 2 * H * T - 11 * D)
    return e * B * T * per_token


def activation_bytes(s: Shapes, batch: int, grad_ckpt: int = 0, attn: str = "sdpa", elem: int = 2) -> dict:
    """Bytes of activations at the step's peak for a micro-batch of `batch` images (module doc)."""
    e, B = elem, batch
    k = min(max(grad_ckpt, 0), s.depth)
    N, M = s.num_patches, s.masked
    T_enc, T_dec = s.visible + 1, N + 1
    full_enc = block_activation_bytes(B, T_enc, s.width, s.heads, e, attn)
    work_enc = backward_work_bytes(B, T_enc, s.width, s.heads, e, attn)
    work_dec = backward_work_bytes(B, T_dec, s.dec_width, s.dec_heads, e, attn)
    out = {
        "encoder_blocks": (s.depth - k) * full_enc + k * e * B * T_enc * s.width,
        "decoder_blocks": s.dec_depth * block_activation_bytes(B, T_dec, s.dec_width, s.dec_heads, e, attn),
        "outside_blocks": (2 * e * B * T_enc * s.width + 2 * e * B * M * s.dec_width  # norm / linear inputs
                           + 8 * B * (T_enc + M)  # their layer norms' fp32 mean and rstd
                           + e * B * N * s.width + e * B * N * s.dec_width  # gather inputs (ids_keep, restore)
                           + e * B * T_dec * s.dec_width  # gather input (ids_masked): the decoder output
                           + 8 * B * M * s.channels + 4 * B * N * s.channels),  # loss; teacher targets
        "inputs": B * 3 * s.image_size**2 * (4 + (e if e != 4 else 0)),  # fp32 images (+ e-byte copy)
        "recompute": full_enc if k else 0,
    }
    kept = out["encoder_blocks"] + out["outside_blocks"] + out["inputs"]
    # backward runs the decoder first (all encoder activations still kept), then the encoder
    # blocks, each recomputed if checkpointed, after the decoder's activations are gone
    out["decoder_phase"] = kept + out["decoder_blocks"] + work_dec
    out["encoder_phase"] = kept + out["recompute"] + work_enc
    out["student_peak"] = max(out["decoder_phase"], out["encoder_phase"])
    # the teacher runs before the student's forward: its transient overlaps only the images
    peak = s.teacher_peak_per_image
    per_image = 4 * peak["fp32_elements"] if "fp32_elements" in peak else e * peak["elements"]
    out["teacher_peak"] = B * per_image + out["inputs"]
    out["total"] = max(out["student_peak"], out["teacher_peak"])
    return out


# ---------------------------------------------------------------------------------------------
# The whole estimate
# ---------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    shapes: Shapes
    zero: int
    gpus: int
    micro_batch: int
    grad_ckpt: int
    offload_optimizer: bool
    attn: str
    states: dict
    deepspeed_states: float | None
    activations: dict
    teacher_bytes: float  # fp32 weights + their bf16 autocast copies during the forward
    buffers: float  # DeepSpeed reduce / prefetch buckets

    @property
    def total(self) -> float:
        return self.states["total"] + self.activations["total"] + self.teacher_bytes + self.buffers

    def fits(self, device_bytes: float = H100_BYTES) -> bool:
        return self.total <= HEADROOM * device_bytes


def estimate(s: Shapes, zero: int, gpus: int, micro_batch: int, grad_ckpt: int = 0,
             offload_optimizer: bool = False, attn: str = "sdpa", precision: str = "bf16") -> Estimate:
    elem = 2 if precision == "bf16" else 4
    states = model_state_bytes(s.params, zero, gpus, offload_optimizer, precision)
    ds = deepspeed_model_states(s.params, s.largest_layer, zero, gpus, offload_optimizer) if zero else None
    teacher_bytes = s.teacher_params * (4 + (2 if precision == "bf16" else 0))
    buffers = 2 * DS_BUCKET * (2 if zero == 3 else 1) if zero else 0
    return Estimate(s, zero, gpus, micro_batch, grad_ckpt, offload_optimizer, attn, states, ds,
                    activation_bytes(s, micro_batch, grad_ckpt, attn, elem), teacher_bytes, buffers)


def max_micro_batch(s: Shapes, device_bytes: float = H100_BYTES, **kw) -> int:
    """Largest micro-batch whose estimate fits within HEADROOM of `device_bytes` (0 if none)."""
    lo, hi = 0, 1
    while estimate(s, micro_batch=hi, **kw).fits(device_bytes):
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:  # estimate(lo) fits, estimate(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(s, micro_batch=mid, **kw).fits(device_bytes) else (lo, mid)
    return lo


def report(est: Estimate, device_bytes: float = H100_BYTES) -> str:
    s, st, a = est.shapes, est.states, est.activations
    g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    kw = dict(zero=est.zero, gpus=est.gpus, grad_ckpt=est.grad_ckpt,
              offload_optimizer=est.offload_optimizer, attn=est.attn)
    lines = [
        f"{s.model}/{s.patch_size} @ {s.image_size}px: student {s.params / 1e6:.1f}M params "
        f"(largest layer {s.largest_layer / 1e6:.2f}M), N={s.num_patches} V={s.visible} M={s.masked}, "
        f"decoder {s.dec_depth}x{s.dec_width}, teacher {s.teacher_params / 1e6:.1f}M C={s.channels}",
        f"ZeRO-{est.zero} over {est.gpus} GPUs, micro-batch {est.micro_batch}, grad_ckpt {est.grad_ckpt}/{s.depth}, "
        f"attention {est.attn}, bf16{', optimizer offloaded to CPU' if est.offload_optimizer else ''}",
        "model states (16 bytes/param rule), per GPU:",
        f"  bf16 params            {g(st['params'])}",
        f"  bf16 grads             {g(st['grads'])}",
        f"  fp32 master + Adam m/v {g(st['optimizer'])}"
        + (f"   (+{st['optimizer_on_cpu'] / GiB:.2f} GiB in CPU memory)" if est.offload_optimizer else ""),
        f"  total                  {g(st['total'])}",
    ]
    if est.deepspeed_states is not None:
        d = est.deepspeed_states - st["total"]
        lines.append(f"  DeepSpeed's estimator  {g(est.deepspeed_states)}   (DS - rule = {d / GiB:+.2f} GiB: "
                     + ("fp32 grad shard 4P/G" if est.zero < 3 and not est.offload_optimizer else
                        "4L gathered layer + 2P/G" if est.zero == 3 and not est.offload_optimizer else
                        "DS streams grads to CPU") + "; see module doc)")
    lines += [
        "activations (bf16; formula: docs/memory.md):",
        f"  encoder blocks         {g(a['encoder_blocks'])}",
        f"  decoder blocks         {g(a['decoder_blocks'])}",
        f"  outside the blocks     {g(a['outside_blocks'])}",
        f"  input images           {g(a['inputs'])}",
        f"  recomputed block       {g(a['recompute'])}",
        f"  peak, decoder backward {g(a['decoder_phase'])}",
        f"  peak, encoder backward {g(a['encoder_phase'])}",
        f"  teacher forward peak   {g(a['teacher_peak'])}",
        f"teacher weights          {g(est.teacher_bytes)}",
        f"DeepSpeed buckets        {g(est.buffers)}",
        f"activations at peak      {g(a['total'])}",
        f"TOTAL per GPU            {g(est.total)}   of {device_bytes / GiB:.1f} GiB "
        f"({HEADROOM:.0%} usable = {HEADROOM * device_bytes / GiB:.1f} GiB): "
        + ("FITS" if est.fits(device_bytes) else "DOES NOT FIT"),
        f"largest micro-batch that fits: {max_micro_batch(est.shapes, device_bytes, **kw)}"
        + ("" if est.grad_ckpt == s.depth else
           f"; with --grad_ckpt (all {s.depth} blocks): "
           f"{max_micro_batch(est.shapes, device_bytes, **{**kw, 'grad_ckpt': s.depth})}"),
    ]
    return "\n".join(lines)


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m img2vec.memory", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="vit_huge", choices=list(VIT_SIZES), help="student size preset")
    ap.add_argument("--zero_stage", "--zero-stage", type=int, default=3, choices=(0, 1, 2, 3),
                    help="DeepSpeed ZeRO stage (0 = plain data parallel)")
    ap.add_argument("--num_gpus", "--num-gpus", type=int, default=8, help="GPUs the states are sharded over")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=64, help="images per GPU per step (micro-batch)")
    ap.add_argument("--grad_ckpt", "--grad-ckpt", type=int, nargs="?", const=-1, default=0,
                    help="checkpoint the first K encoder blocks; bare flag = all of them")
    ap.add_argument("--image_size", "--image-size", type=int, default=224, help="input side in pixels")
    ap.add_argument("--patch_size", "--patch-size", type=int, default=0, help="0 = the size's own (14 for vit_huge)")
    ap.add_argument("--mask_ratio", "--mask-ratio", type=float, default=0.75, help="fraction of patches masked")
    ap.add_argument("--decoder_depth", "--decoder-depth", type=int, default=8, help="decoder blocks")
    ap.add_argument("--decoder_width", "--decoder-width", type=int, default=512, help="decoder width")
    ap.add_argument("--decoder_heads", "--decoder-heads", type=int, default=16, help="decoder heads")
    ap.add_argument("--teacher", default="resnet50", help="pixels, hog, or a timm model name")
    ap.add_argument("--teacher_stage", "--teacher-stage", default="3",
                    help="stage index or module name of a timm teacher (pixels/hog: ignored)")
    ap.add_argument("--attn_impl", "--attn-impl", default="sdpa", choices=("sdpa", "math"),
                    help="attention backend: sdpa keeps no (T, T) matrix, math does")
    ap.add_argument("--offload_optimizer", "--offload-optimizer", action="store_true",
                    help="ZeRO-2/3 optimizer states in CPU memory")
    ap.add_argument("--gpu_mem_gib", "--gpu-mem-gib", type=float, default=round(H100_BYTES / GiB, 2),
                    help="device memory in GiB (an 80 GB H100 reports 79.6)")
    args = ap.parse_args(argv)
    if args.num_gpus < 1 or args.batch_size < 1:
        print("error: --num_gpus and --batch_size must be >= 1", file=sys.stderr)
        return 2
    try:
        s = model_shapes(args.model, args.image_size, args.patch_size, args.mask_ratio, args.decoder_depth,
                         args.decoder_width, args.decoder_heads, args.teacher, args.teacher_stage)
        k = s.depth if args.grad_ckpt < 0 else args.grad_ckpt
        est = estimate(s, args.zero_stage, args.num_gpus, args.batch_size, k, args.offload_optimizer,
                       args.attn_impl)
    except ValueError as e:  # unknown teacher / stage, offload below ZeRO-2, hog with a bad patch size
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(est, args.gpu_mem_gib * GiB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
