"""Frozen feature teacher: one stage of a timm CNN, resampled to the student's patch grid.

The teacher turns images (B, 3, H, W) into regression targets (B, N, C), one C-dim
feature per student patch, N = (H // p) * (W // p), in ViT patch order.

Stage numbering is timm's `features_only` `out_indices`; for resnet50:

    stage    0     1     2     3     4
    module   act1  layer1 layer2 layer3 layer4
    stride   2     4     8     16    32
    C        64    256   512   1024  2048

The default, stage 3, has stride 16 = the ViT-B/16 patch size, so no resampling happens.
"""
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

logger = logging.getLogger("img2vec.teacher")

_PREFIXES = ("module.", "backbone.", "encoder.")  # DDP, detection / SSL wrappers


def validate_teacher_stage(name: str, stage: int) -> None:
    """Raise ValueError (one line) if timm has no model `name` or it has no stage `stage`.

    Cheap (~40 ms): the model is built on the meta device, only for its feature_info.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown teacher {name!r}: pass a timm model name such as resnet50")
    try:
        with torch.device("meta"):
            info = timm.create_model(name, pretrained=False, features_only=True).feature_info
    except Exception as e:  # e.g. a model without features_only support
        raise ValueError(f"teacher {name} cannot give feature maps (features_only): {e}") from None
    strides = info.reduction()
    if not 0 <= stage < len(strides):
        raise ValueError(f"teacher {name} has stages 0..{len(strides) - 1} "
                         f"(strides {','.join(map(str, strides))}); got stage {stage}")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch.save file; unwrap and strip prefixes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weights file not found: {path} "
                                "(pass a local .safetensors/.pth file, or teacher_weights=random)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:  # .pth / .pt / .bin; weights_only: never run pickled code from a checkpoint
            sd = torch.load(path, map_location="cpu", weights_only=True)
        # training checkpoints wrap the weights: {"state_dict": ...} or {"model": ...}
        while isinstance(sd, dict) and isinstance(sd.get("state_dict", sd.get("model")), dict):
            sd = sd.get("state_dict", sd.get("model"))
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise TypeError(f"found a {type(sd).__name__}, not a dict of tensors")
    except Exception as e:
        lines = str(e).strip().splitlines()  # pickle errors run to many lines: keep the first
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"could not read teacher weights {path}: {reason}; expected a state "
                         "dict saved with torch.save or a .safetensors file") from None
    out = {}
    for k, v in sd.items():
        while k.startswith(_PREFIXES):  # e.g. "module.backbone.layer1..." -> "layer1..."
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_teacher_weights(model_or_backbone: nn.Module, path: str) -> None:
    """Load a classifier / backbone state dict at `path` into a Teacher or its timm backbone.

    timm's features_only model keeps the classifier's module names (`conv1.weight`,
    `layer1.0.conv1.weight`, ...), so a full resnet50 state dict (timm's or torchvision's,
    same key names) fits after dropping the keys of later stages and the head (`layer4.*`,
    `fc.*` for stage 3). Missing keys of the used modules, or shape mismatches, raise.
    """
    model = getattr(model_or_backbone, "backbone", model_or_backbone)
    sd = _read_state_dict(path)
    own = model.state_dict()
    dropped = [k for k in sd if k not in own]
    # num_batches_tracked is unused in eval; some exporters omit it
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    bad_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and sd[k].shape != v.shape]
    checks = (("shape mismatches (file vs model)", bad_shape), ("missing keys", missing))
    problems = [f"{len(keys)} {what}, e.g. {', '.join(keys[:5])}" for what, keys in checks if keys]
    if problems:
        raise ValueError(f"teacher weights {path} do not fit the teacher: {'; '.join(problems)}")
    logger.info("loaded teacher weights %s: %d tensors, dropped %d unused (later stages/head)",
                path, len(own) - len(missing), len(dropped))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


class Teacher(nn.Module):
    """Frozen timm CNN stage giving per-patch targets: images (B, 3, H, W) -> (B, N, C) fp32.

    weights: "random" (seeded init, for tests and smoke runs only) or a local file path.
    Always eval, no grad; on CUDA runs channels_last under bf16 autocast, on CPU in fp32.
    """

    def __init__(self, name: str, stage: int, weights: str, patch_size: int, image_size: int,
                 seed: int = 0):
        super().__init__()
        validate_teacher_stage(name, stage)
        self.patch_size, self.image_size = patch_size, image_size
        # seeded init in a forked RNG: same weights for the same seed, global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = timm.create_model(name, pretrained=False, features_only=True,
                                              out_indices=(stage,))
        if weights == "random":
            logger.warning("teacher weights are random: targets carry no learned knowledge; "
                           "pass teacher_weights=PATH for real pretraining")
        else:
            load_teacher_weights(self.backbone, weights)
        self.backbone.requires_grad_(False)
        self._channels_last = False
        self.eval()

    @property
    def channels(self) -> int:
        """C, the feature width of the chosen stage."""
        return self.backbone.feature_info.channels()[0]

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell of the chosen stage."""
        return self.backbone.feature_info.reduction()[0]

    @property
    def num_patches(self) -> int:
        """N at the configured image_size: (image_size // p) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # frozen: BatchNorm must keep its running stats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> targets (B, N, C) fp32, N = (H // p) * (W // p), row-major."""
        B, _, H, W = images.shape
        gh, gw = H // self.patch_size, W // self.patch_size
        if images.is_cuda:
            if not self._channels_last:  # once, on the first CUDA call (after .to(device))
                self.backbone.to(memory_format=torch.channels_last)
                self._channels_last = True
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fmap = self.backbone(images)[0]  # (B, C, h, w)
        else:
            fmap = self.backbone(images)[0]  # (B, C, h, w)
        fmap = fmap.float()
        h, w = fmap.shape[-2:]
        if (h, w) != (gh, gw):
            if h >= gh and w >= gw:  # finer stage (stride < p): average the cells of a patch
                fmap = F.adaptive_avg_pool2d(fmap, (gh, gw))
            else:  # coarser stage (stride > p): upsample, smooth between cell centers
                fmap = F.interpolate(fmap, size=(gh, gw), mode="bilinear", align_corners=False)
        # (B, C, gh, gw) -> (B, N, C); patch index = row * gw + col, as ViT's patch_embed
        return fmap.flatten(2).transpose(1, 2).contiguous()
