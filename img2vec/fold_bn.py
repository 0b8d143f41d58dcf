"""Fold a frozen CNN's batch norms into the convolutions that feed them.

In eval mode a BatchNorm2d is a per-channel affine map of its input,

    bn(y) = (y - mean) * s + beta,    s = gamma / sqrt(var + eps)      (running mean / var)

so after a convolution y = conv(x; W, b) it is the convolution with

    W' = W * s (per output channel),    b' = (b - mean) * s + beta.

The frozen teacher then runs one kernel where it ran two: on a GPU the batch norm is a full
read and write of every activation (in an eager ViT-B step's profile, 4.6 of the teacher's
15.8 ms). Exact in real arithmetic; in fp32 the folded output differs by rounding (~1e-6
relative). Under bf16 autocast W' is rounded to bf16 instead of W: the targets move by
bf16 rounding, as they do between any two bf16 kernels.

Which batch norm follows which convolution is read from one forward on a small input: a pair
is a Conv2d whose output tensor is the input of a plain nn.BatchNorm2d, each module called
once. (Subclasses such as timm's BatchNormAct2d, which also apply an activation, are left
alone.) The folded copy is checked against the original on that input, and kept only if they
agree: a model whose convolution output also goes elsewhere (where folding would change
that other use) keeps its batch norms.
"""
import copy
import logging

import torch
import torch.nn as nn

logger = logging.getLogger("img2vec.teacher")


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """[(conv name, bn name)] where the forward on `example` feeds the conv's output to the bn."""
    names = {m: n for n, m in model.named_modules()}
    produced, calls, pairs, keep = {}, {}, [], []

    def after_conv(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = module
        keep.append(output)  # alive until the end: no other tensor can reuse its id

    def before_bn(module, inputs):
        calls[module] = calls.get(module, 0) + 1
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs.append((conv, module))

    handles = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(before_bn) for m in model.modules() if type(m) is nn.BatchNorm2d]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [(names[c], names[b]) for c, b in pairs if calls[c] == 1 and calls[b] == 1]


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv := bn(conv(.)) in place: W' = W * s, b' = (b - mean) * s + beta (fp32 math)."""
    w = conv.weight.detach().float()  # (O, I / groups, kh, kw)
    s = torch.rsqrt(bn.running_var.float() + bn.eps)  # (O,)
    if bn.weight is not None:
        s = s * bn.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(s)
    b = (b - bn.running_mean.float()) * s
    if bn.bias is not None:
        b = b + bn.bias.detach().float()
    conv.weight = nn.Parameter((w * s.view(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def fold_batch_norms(model: nn.Module, image_size: int = 64) -> tuple[nn.Module, int]:
    """(model with its conv -> batch norm pairs folded, number folded); the model itself when
    there is nothing to fold, it is on the meta device, or the folded copy disagrees with it.
    The pairs are read and the copy checked on one random (1, 3, image_size, image_size) image:
    give the size the model will run at, which it is known to take."""
    params = next(model.parameters(), None)
    if params is None or params.is_meta or model.training or not any(
            type(m) is nn.BatchNorm2d for m in model.modules()):
        return model, 0
    example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    example = example.to(params.device, params.dtype)  # (1, 3, S, S)
    pairs = conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        fold_conv_bn(modules[conv_name], modules[bn_name])
        parent, _, child = bn_name.rpartition(".")
        setattr(modules[parent] if parent else folded, child, nn.Identity())
    with torch.no_grad():
        want, got = model(example), folded(example)
    want, got = (want[0], got[0]) if isinstance(want, (list, tuple)) else (want, got)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()
    if not err <= 1e-4:  # also False for NaN
        logger.warning("folding %d batch norms into their convolutions changed the teacher's output "
                       "(max relative error %.2g): they run as they are", len(pairs), err)
        return model, 0
    return folded, len(pairs)
