"""Frozen feature teacher: one stage of a timm CNN or one block of a timm ViT, on the student grid.

The teacher turns images (B, 3, H, W) into regression targets (B, N, C), one C-dim
feature per student patch, N = (H // p) * (W // p), in ViT patch order (row-major).

`stage` indexes the model's feature list (timm `features_only` `out_indices`), or names
its module. For a CNN it is a stage; for resnet50:

    stage    0     1     2     3     4
    module   act1  layer1 layer2 layer3 layer4
    stride   2     4     8     16    32
    C        64    256   512   1024  2048

The weight-free teachers `pixels` (MAE's target) and `hog` (MaskFeat's) live in
img2vec/hog.py; `build_teacher` picks between them and this class.

The default, stage 3, has stride 16 = the ViT-B/16 patch size, so no resampling happens.

For a ViT (timm VisionTransformer / Eva family: DeiT, DINO(v2), MoCo v3, BEiT-style) it
is a block: stage k = the output of `blocks[k]`, 0-based (vit_tiny_patch16_224: 0..11,
module "blocks.k"), before the final norm. The cls / register (prefix) tokens are dropped,
the patch tokens are reshaped to their (h, w) grid, and blocks after k are not even built.
An image side that is no multiple of the ViT's patch size is cropped (right / bottom) to
one, as a stride-p convolution would ignore those pixels; the position embedding is
resampled to the grid.

Resampling to the student grid (gh, gw) = (H // p, W // p): a finer map (stride < p) is
adaptive-average-pooled down (each patch = mean of the cells it covers); a coarser map
(stride > p) is bilinearly interpolated up (align_corners=False). Equal sizes pass through.

Checkpoints (`load_teacher_weights`): a plain state dict, or one under "state_dict",
"model", "teacher" or "student" (DINO: "teacher" is preferred), with "module."
(DDP), "base_encoder." (MoCo v3; "momentum_encoder." and "predictor." are dropped),
"backbone." (DINO; the projection "head." is dropped) or "encoder." prefixes; torchvision
ResNet names (the same as timm's resnet); .safetensors or torch.save files.
"""
import argparse
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models._features import FeatureGetterNet

from img2vec.fold_bn import fold_batch_norms
from img2vec.stage import StageInfo

logger = logging.getLogger("img2vec.teacher")

# Wrapper entries that hold the weights, in order of preference (DINO: teacher over student).
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student")
# Key prefixes that select the backbone inside a wrapper: DDP, MoCo v3, DINO / detection, SSL.
_PREFIXES = ("module.", "base_encoder.", "backbone.", "encoder.")


def _is_vit(model: nn.Module) -> bool:
    """A patch-token transformer (VisionTransformer, Eva, ...): blocks + patch_embed + prefix tokens."""
    return all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))


def resolve_teacher_stage(name: str, stage: "int | str") -> StageInfo:
    """Resolve a stage index (int or digit string) or module name ("layer3", "blocks.6").

    Raises ValueError (one line) if timm has no model `name` or it has no such stage.
    Cheap (~50 ms): the model is built on the meta device, only for its feature_info.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"{name}*")[:4]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown teacher {name!r}: pass a timm model name such as resnet50{hint}")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        info = list(model.feature_info)  # [{"module", "num_chs", "reduction"}], = features_only order
    except Exception as e:  # e.g. a model without feature_info
        raise ValueError(f"teacher {name} cannot give feature maps (features_only): {e}") from None
    kind = "vit" if _is_vit(model) else "cnn"
    modules = [d["module"] for d in info]
    strides = [d["reduction"] for d in info]
    if isinstance(stage, str) and stage.lstrip("-").isdigit():
        stage = int(stage)
    if isinstance(stage, str):
        if stage not in modules:
            raise ValueError(f"teacher {name} has no stage {stage!r}; its stages are "
                             + ", ".join(f"{i}={m}" for i, m in enumerate(modules)))
        index = modules.index(stage)
    else:
        index = stage
    if not 0 <= index < len(info):
        if kind == "vit":
            raise ValueError(f"teacher {name} has blocks 0..{len(info) - 1} (blocks.0..blocks."
                             f"{len(info) - 1}, stride {strides[0]}); got block {index}")
        raise ValueError(f"teacher {name} has stages 0..{len(info) - 1} (strides "
                         f"{','.join(map(str, strides))}; modules {','.join(modules)}); "
                         f"got stage {index}")
    return StageInfo(kind, index, modules[index], strides[index], info[index]["num_chs"])


def validate_teacher_stage(name: str, stage: "int | str") -> None:
    """Raise ValueError (one line) if timm has no model `name` or it has no stage `stage`.

    The weight-free teachers (pixels, hog) have no stages: any stage passes for them.
    """
    from img2vec.hog import WEIGHT_FREE_TEACHERS

    if name not in WEIGHT_FREE_TEACHERS:
        resolve_teacher_stage(name, stage)


def build_teacher(name: str, stage: "int | str", weights: str, patch_size: int, image_size: int,
                  seed: int = 0, fold_bn: bool = True) -> nn.Module:
    """The teacher for a run config: `pixels` / `hog` (img2vec.hog, no weights) or a timm model.

    All return a frozen module images (B, 3, H, W) -> (B, N, C) fp32 with `.channels`, `.stride`,
    `.num_patches` and `.info`. A weights path given to a weight-free teacher is ignored, with
    one warning; "" means "random" for a timm teacher.
    """
    from img2vec.hog import WEIGHT_FREE_TEACHERS, WeightFreeTeacher

    if name in WEIGHT_FREE_TEACHERS:
        if weights not in ("", "random", None):
            logger.warning("teacher_weights does not apply to teacher %s (it has no weights): ignoring %s",
                           name, weights)
        return WeightFreeTeacher(name, patch_size, image_size)
    return Teacher(name, stage, weights or "random", patch_size, image_size, seed=seed, fold_bn=fold_bn)


def _describe_top_level(obj) -> str:
    """The top-level keys of a loaded checkpoint, short: "epoch (int), net (dict, 62 entries)"."""
    if not isinstance(obj, dict):
        return f"none (the file holds a {type(obj).__name__}, not a dict)"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # group tensor names
        groups: dict[str, int] = {}
        for k in obj:
            head = k.split(".", 1)[0]
            groups[head] = groups.get(head, 0) + 1
        items = [f"{h}.* ({n} tensors)" if n > 1 else h for h, n in groups.items()]
    else:
        items = [f"{k} (dict, {len(v)} entries)" if isinstance(v, dict)
                 else f"{k} ({type(v).__name__})" for k, v in obj.items()]
    more = f", ... {len(items) - 12} more" if len(items) > 12 else ""
    return ", ".join(items[:12]) + more if items else "none (empty dict)"


class TeacherWeightsError(ValueError):
    """A teacher_weights file that cannot be read or does not fit the teacher: the user's file,
    not a bug, so entry points print its one-line message and exit 2."""


class CheckpointLayoutError(TeacherWeightsError):
    """A checkpoint whose weights could not be found; the message lists its top-level keys."""


def _layout_error(path: str, obj, expected: str) -> CheckpointLayoutError:
    return CheckpointLayoutError(
        f"unknown checkpoint layout in {path}: top-level keys found: {_describe_top_level(obj)}; "
        f"expected the teacher's tensors (e.g. {expected!r}) as a plain state dict or under "
        f"{'/'.join(repr(k) for k in _WRAPPER_KEYS)}, optionally prefixed by "
        f"{'/'.join(repr(p) for p in _PREFIXES)}")


def _read_checkpoint(path: str):
    """Load the raw object of a .safetensors or torch.save file (weights_only: no pickled code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weights file not found: {path} "
                                "(pass a local .safetensors/.pth file, or teacher_weights=random)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        # DINO checkpoints carry their argparse.Namespace "args": allow that one plain class
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = str(e).strip().splitlines()  # pickle errors run to many lines: keep the first
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise TeacherWeightsError(f"could not read teacher weights {path}: {reason}; expected a state "
                         "dict saved with torch.save or a .safetensors file") from None


def _extract_state_dict(obj, path: str, expected: str) -> tuple[dict[str, torch.Tensor], str]:
    """Unwrap a checkpoint to the backbone's state dict; also say where it was found.

    Wrappers are descended in _WRAPPER_KEYS order; then, repeatedly, if some keys carry a
    prefix of _PREFIXES, only those are kept, prefix stripped (so a DINO head or a MoCo
    momentum encoder beside the backbone is dropped, not loaded).
    """
    where, sd = [], obj
    while isinstance(sd, dict):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if wrapper is None:
            break
        where.append(f"[{wrapper!r}]")
        sd = sd[wrapper]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not tensors:
        raise _layout_error(path, obj, expected)
    while True:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        where.append(prefix)
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors, "".join(where) or "plain state dict"


def _adapt_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample a ViT checkpoint's absolute position embedding to the model's patch grid."""
    own = getattr(model, "pos_embed", None)
    if not isinstance(own, torch.Tensor) or "pos_embed" not in sd or sd["pos_embed"].shape == own.shape:
        return
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old = tuple(sd["pos_embed"].shape)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                             num_prefix_tokens=prefix)
    logger.info("resampled the checkpoint's pos_embed %s -> %s (bicubic) for this image size",
                old, tuple(own.shape))


def load_teacher_weights(model_or_backbone: nn.Module, path: str) -> None:
    """Load a classifier / backbone checkpoint at `path` into a Teacher or its timm backbone.

    timm's features_only model keeps the classifier's module names (`conv1.weight`,
    `layer1.0.conv1.weight`, `blocks.0.attn.qkv.weight`, ...), so a full state dict (timm's
    or torchvision's: the same ResNet names) fits after dropping the keys of later stages /
    blocks and the head. A ViT's pos_embed is resampled if the image size differs. Missing
    keys of the used modules, or shape mismatches, raise TeacherWeightsError; a file where no key
    matches raises CheckpointLayoutError (one of those) listing the top-level keys found.
    """
    if getattr(model_or_backbone, "folded_bn", 0):
        raise ValueError("this teacher's batch norms are folded into its convolutions: give the weights "
                         "when building it (Teacher(name, stage, path, ...)), or build it with fold_bn=False")
    model = getattr(model_or_backbone, "backbone", model_or_backbone)
    if isinstance(model, FeatureGetterNet):  # ViT: the getter wraps the model as .model
        model = model.model
    own = model.state_dict()
    obj = _read_checkpoint(path)
    sd, where = _extract_state_dict(obj, path, expected=next(iter(own)))
    if not any(k in own for k in sd):
        raise _layout_error(path, obj, expected=next(iter(own)))
    sd = dict(sd)
    _adapt_pos_embed(sd, model)
    dropped = [k for k in sd if k not in own]
    # num_batches_tracked is unused in eval; some exporters omit it
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    bad_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and sd[k].shape != v.shape]
    checks = (("shape mismatches (file vs model)", bad_shape), ("missing keys", missing))
    problems = [f"{len(keys)} {what}, e.g. {', '.join(keys[:5])}" for what, keys in checks if keys]
    if problems:
        raise TeacherWeightsError(f"teacher weights {path} do not fit the teacher: {'; '.join(problems)}")
    logger.info("loaded teacher weights %s (%s): %d tensors, dropped %d unused (later stages/head)",
                path, where, len(own) - len(missing), len(dropped))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


class Teacher(nn.Module):
    """Frozen timm CNN stage or ViT block giving per-patch targets: (B, 3, H, W) -> (B, N, C) fp32.

    name: a timm model name; stage: feature index or module name (see the module docstring;
    for a ViT, the block index k). weights: "random" (seeded init, for tests and smoke runs
    only) or a local file path. Always eval, no grad; on CUDA runs channels_last under bf16
    autocast, on CPU in fp32. fold_bn: its batch norms are folded into the convolutions before
    them (one kernel instead of two; exact up to rounding). Output on the student grid
    (H // p, W // p): average-pooled down from a finer map, bilinearly interpolated up from a
    coarser one.
    """

    def __init__(self, name: str, stage: "int | str", weights: str, patch_size: int,
                 image_size: int, seed: int = 0, fold_bn: bool = True):
        super().__init__()
        self.info = resolve_teacher_stage(name, stage)
        self.name, self.patch_size, self.image_size = name, patch_size, image_size
        # a ViT's position embedding is built for image_size, and resampled for other sizes
        extra = dict(img_size=image_size, dynamic_img_size=True) if self.info.kind == "vit" else {}
        # seeded init in a forked RNG: same weights for the same seed, global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # for a ViT: a FeatureGetterNet, blocks after k and the final norm / head pruned
            self.backbone = timm.create_model(name, pretrained=False, features_only=True,
                                              out_indices=(self.info.index,), **extra)
        if weights == "random":
            logger.warning("teacher weights are random: targets carry no learned knowledge; "
                           "pass teacher_weights=PATH for real pretraining")
        else:
            load_teacher_weights(self.backbone, weights)
        self.backbone.requires_grad_(False)
        self._set_input_normalization()
        self._channels_last = False
        self.eval()
        self.folded_bn = 0  # batch norms folded into their convolutions (img2vec/fold_bn.py)
        if fold_bn:
            self.backbone, self.folded_bn = fold_batch_norms(self.backbone, image_size)

    def _set_input_normalization(self) -> None:
        """Images arrive normalized with ImageNet's mean/std; a teacher trained with others (CLIP,
        BEiT, Inception-style 0.5/0.5) gets its own: x' = x * std_in / std_t + (mean_in - mean_t) / std_t,
        one fused multiply-add on the device."""
        from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        self.renormalize = any(abs(a - b) > 1e-6 for a, b in zip(mean + std, tuple(IMAGENET_MEAN) + tuple(IMAGENET_STD)))
        mean_in, std_in, mean_t, std_t = (torch.tensor(v).view(1, 3, 1, 1)
                                          for v in (IMAGENET_MEAN, IMAGENET_STD, mean, std))
        self.register_buffer("in_scale", std_in / std_t, persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("in_shift", (mean_in - mean_t) / std_t, persistent=False)  # (1, 3, 1, 1)
        if self.renormalize:
            logger.info("teacher %s expects mean %s, std %s: images are re-normalized for it", self.name,
                        tuple(round(m, 4) for m in mean), tuple(round(v, 4) for v in std))

    @property
    def channels(self) -> int:
        """C, the feature width of the chosen stage / block."""
        return self.backbone.feature_info.channels()[0]

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell of the chosen stage (a ViT's patch size)."""
        return self.backbone.feature_info.reduction()[0]

    @property
    def num_patches(self) -> int:
        """N at the configured image_size: (image_size // p) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: BatchNorm must keep its running stats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> targets (B, N, C), N = (H // p) * (W // p), row-major.

        A strided view of the feature map, not a copy: bf16 and channels_last on CUDA (so the view
        is dense along C and the fused loss reads it in place), fp32 elsewhere. Resampling to the
        patch grid, when the stride differs from p, runs in fp32 first.
        """
        B, _, H, W = images.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        if self.renormalize:
            images = torch.addcmul(self.in_shift, images, self.in_scale)  # the teacher's own mean/std
        s = self.stride
        if self.info.kind == "vit" and (H % s or W % s):  # the pixels a stride-s conv would skip
            images = images[..., :H - H % s, :W - W % s]  # (B, 3, H // s * s, W // s * s)
        if images.is_cuda:
            if not self._channels_last:  # once, on the first CUDA call (after .to(device))
                self.backbone.to(memory_format=torch.channels_last)
                self._channels_last = True
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fmap = self.backbone(images)[0]  # (B, C, h, w); ViT: patch tokens, prefix dropped
        else:
            fmap = self.backbone(images)[0]  # (B, C, h, w)
        h, w = fmap.shape[-2:]
        if (h, w) != (gh, gw):
            fmap = fmap.float()
            if h >= gh and w >= gw:  # finer stage (stride < p): average the cells of a patch
                fmap = F.adaptive_avg_pool2d(fmap, (gh, gw))
            else:  # coarser stage (stride > p): upsample, smooth between cell centers
                fmap = F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)
        # (B, C, gh, gw) -> (B, N, C); patch index = row * gw + col, as ViT's patch_embed
        return fmap.flatten(2).transpose(1, 2)
