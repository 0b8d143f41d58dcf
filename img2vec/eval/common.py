"""What every evaluation shares: find and load an encoder, read a labeled ImageFolder, pool features.

An encoder can be given as any of:
    run_dir/encoder.safetensors          an export (encoder.json beside it holds the timm kwargs)
    run_dir  or  export_dir              a folder holding encoder.safetensors; a run folder without
                                         one falls back to its latest DeepSpeed checkpoint
    run_dir/checkpoints/step_000050      one DeepSpeed checkpoint (ZeRO-1/2/3), consolidated to fp32

The weights always come back as an encoder state dict with timm VisionTransformer names
(no "encoder." prefix) plus the timm kwargs that describe the architecture.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import yaml
from torch.utils.data import Dataset, default_collate

from img2vec.checkpoint import consolidated_fp32_state_dict, frozen_parameters, newest_complete
from img2vec.pretrained_cfg import EVAL_CROP_PCT
from img2vec.vit import VIT_SIZES, VitEncoder

POOLS = ("cls", "avg")  # cls: class token (timm global_pool="token"); avg: mean of patch tokens


@dataclass
class CheckpointRef:
    """A DeepSpeed checkpoint: the run folder (holds config.yaml) and the tag under checkpoints/."""

    run_dir: str
    tag: str


def find_checkpoint(path: str) -> CheckpointRef | None:
    """A run dir -> its newest complete checkpoint; a run_dir/checkpoints/<tag> dir -> that one;
    else None. `latest` is not followed (a plain file that could point anywhere, even out of the
    run folder); whatever is found is verified again when it is loaded."""
    path = os.path.abspath(path)
    newest = newest_complete(path)
    if newest is not None:
        return CheckpointRef(path, os.path.basename(newest))
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.isdir(path):
        return CheckpointRef(os.path.dirname(parent), os.path.basename(path))
    return None


def encoder_from_run_config(run_dir: str) -> VitEncoder:
    """A freshly initialised encoder of the architecture in run_dir/config.yaml."""
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: pass a run folder written by img2vec/train.py")
    with open(config_path) as f:
        cfg = yaml.safe_load(f)
    size = VIT_SIZES[cfg["model"]]
    return VitEncoder(cfg["image_size"], cfg["patch_size"] or size.patch_size, size.width, size.depth, size.heads)


def checkpoint_student_state(ref: CheckpointRef, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 student state dict, the encoder's timm kwargs) from one DeepSpeed checkpoint,
    verified first (complete, sha256, safe pickles unless trust): CheckpointError, one line, if not."""
    encoder = encoder_from_run_config(ref.run_dir)
    frozen = {f"encoder.{k}": v for k, v in frozen_parameters(encoder).items()}  # the fixed pos_embed
    return consolidated_fp32_state_dict(ref.run_dir, ref.tag, frozen, trust), encoder.timm_kwargs()


def encoder_only(student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Student state dict -> the encoder's entries without the "encoder." prefix (timm names)."""
    prefix = "encoder."
    out = {k[len(prefix):]: v.float() for k, v in student_state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError("no encoder.* weights in the checkpoint: is this an img2vec run?")
    return out


def _export_files(path: str) -> tuple[str, str] | None:
    """(safetensors, json) of an export named by its file or its folder; None if there is none."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        stem = path[: -len(".safetensors")]
        for meta in (stem + ".json", os.path.join(os.path.dirname(path), "encoder.json")):
            if os.path.isfile(meta):
                return path, meta
        raise FileNotFoundError(f"{stem}.json not found beside {path}: it holds the timm kwargs "
                                f"(python -m img2vec.export writes both)")
    weights, meta = os.path.join(path, "encoder.safetensors"), os.path.join(path, "encoder.json")
    if os.path.isfile(weights) and os.path.isfile(meta):
        return weights, meta
    return None


def load_encoder_state(path: str, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(encoder state dict with timm names, timm kwargs) from an export, run dir or checkpoint dir.
    A checkpoint is verified before anything is unpickled; trust=True lets through pickles that
    would run code (--trust_checkpoint)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass encoder.safetensors, a run folder "
                                f"or a run_dir/checkpoints/<tag> folder")
    export = _export_files(path)
    if export is not None:
        from safetensors.torch import load_file

        with open(export[1]) as f:
            return load_file(export[0]), json.load(f)["timm_kwargs"]
    ref = find_checkpoint(path)
    if ref is None:
        raise FileNotFoundError(f"no encoder.safetensors and no DeepSpeed checkpoint under {path}")
    state, timm_kwargs = checkpoint_student_state(ref, trust)
    return encoder_only(state), timm_kwargs


def build_encoder(timm_kwargs: dict, attn_impl: str = "sdpa") -> VitEncoder:
    """Our VitEncoder for timm VisionTransformer kwargs (as encoder.json stores them)."""
    size = timm_kwargs["img_size"]
    size = size if isinstance(size, int) else size[0]
    return VitEncoder(size, timm_kwargs["patch_size"], timm_kwargs["embed_dim"], timm_kwargs["depth"],
                      timm_kwargs["num_heads"], timm_kwargs.get("mlp_ratio", 4.0), attn_impl)


def load_encoder(path: str, init: str = "pretrained", seed: int = 0, trust: bool = False) -> VitEncoder:
    """The encoder at `path` (eval mode, fp32, CPU); init="random": same architecture, seeded init."""
    state, timm_kwargs = load_encoder_state(path, trust)
    if init == "random":
        torch.manual_seed(seed)
        return build_encoder(timm_kwargs).eval()
    if init != "pretrained":
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    encoder = build_encoder(timm_kwargs)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens (B, 1 + N, D) from the encoder (after its final norm) -> (B, D)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


# --- Data: labeled ImageFolder splits (root/<class>/<image>) --------------------------------


def eval_transform(image_size: int, crop_pct: float = EVAL_CROP_PCT):
    """Resize the short side to image_size / crop_pct (bicubic), center crop image_size, normalize
    (ImageNet mean/std): the field's evaluation protocol (timm's crop_pct, crop_mode "center")."""
    import torchvision.transforms as T

    from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return T.Compose([T.Resize(int(image_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_folder(path: str, transform):
    """torchvision ImageFolder with one clear line when the folder is missing or empty."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder: pass an ImageFolder split (root/<class>/<image>)")
    return ImageFolder(path, transform=transform)


Sample = tuple[torch.Tensor | None, int, list]  # (image or None where left out, label, (name, reason) skipped)


class ReadableImages(Dataset):
    """The images of a data set (ImageFolder tree, file list, shards) through `transform`, unusable
    files skipped as pretraining skips them.

    dataloading's ImageDataset lists and decodes the files (the same extensions, check_image and
    PIL decode), so a file is skipped for the same reason and named the same way as in pretraining.
    In its place: with substitute=True (training) the next usable file, with that file's label, so a
    batch keeps its size; with substitute=False (evaluation) nothing, so each usable file counts once.
    dataset[i] = (transform(image) or None where file i is left out, label (-1 when unknown), the
    (name, reason) of each unusable file met); batch with collate_readable. `classes`: the class
    folder names in label order (empty for a file list or shards). A data set without one usable
    image raises DataError, one line, at construction.
    """

    def __init__(self, path: str, transform=None, substitute: bool = False):
        from dataloading.datasets import ImageDataset
        from dataloading.sources import DataError

        self.transform, self.substitute = transform, substitute
        self.files = ImageDataset(path, image_size=1, augment=False)  # listing and decoding only: no crop
        self.labels = self.files.labels
        is_tree = self.files.source.kind == "folder"
        self.classes = sorted(e.name for e in os.scandir(path) if e.is_dir()) if is_tree else []  # label order
        try:
            self.files.load_image(0)  # one decode; a decode of every file when none can be used
        except DataError:
            raise DataError(f"no usable image in {path}: all {len(self)} files are unreadable; "
                            f"python -m dataloading.verify --full {path} says why") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        image, source, skipped = self.files.load_image(index)
        if source != index and not self.substitute:
            return None, -1, skipped[:1]  # file `index` itself; the others are named at their own index
        return (self.transform(image) if self.transform else image), self.labels[source], skipped


def labeled_split(path: str, transform, substitute: bool = False) -> ReadableImages:
    """An ImageFolder split root/<class>/<image> as ReadableImages; one line when it is not one."""
    from dataloading.sources import DataError

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder: pass an ImageFolder split (root/<class>/<image>)")
    split = ReadableImages(path, transform, substitute)
    if not split.classes:
        raise DataError(f"{path} holds no class folders: pass an ImageFolder split (root/<class>/<image>)")
    return split


def collate_readable(samples: list[Sample]) -> tuple[torch.Tensor | None, torch.Tensor, list]:
    """ReadableImages samples -> (images (B', 3, H, W) of the B' kept, None if none is; labels (B',);
    every (name, reason) skipped). The DataLoader's collate_fn: skips travel back from workers in the batch."""
    kept = [(image, label) for image, label, _ in samples if image is not None]
    skipped = [skip for _, _, per_sample in samples for skip in per_sample]
    if not kept:
        return None, torch.zeros(0, dtype=torch.long), skipped
    images, labels = default_collate(kept)  # (B', 3, H, W), (B',); in a worker, built in shared memory
    return images, labels, skipped


def readable_batches(loader, skips):
    """(images (B, 3, H, W), labels (B,)) of each batch of a collate_readable loader that kept an image;
    the skipped files go to `skips` (dataloading's SkipLog: each named once in the log)."""
    for images, labels, skipped in loader:
        skips.add(skipped)
        if images is not None:
            yield images, labels


def split_dirs(data: str | None, train: str | None, val: str | None) -> tuple[str, str]:
    """--data ROOT means ROOT/train and ROOT/val; --train/--val name the splits directly."""
    train = train or (os.path.join(data, "train") if data else None)
    val = val or (os.path.join(data, "val") if data else None)
    if not train or not val:
        raise ValueError("give --data ROOT (with ROOT/train and ROOT/val) or both --train and --val")
    return train, val


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, pool: str, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-encoder features of a whole split: (n, D) fp32 on CPU, labels (n,) int64.
    loader: batches (images (B, 3, H, W), labels (B,)); for ReadableImages, readable_batches(...)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, targets in loader:
        tokens = encoder(images.to(device, dtype))  # (B, 1 + N, D)
        feats.append(pool_tokens(tokens, pool).float().cpu())
        labels.append(targets)
    encoder.train(was_training)
    if not feats:
        raise ValueError("no image to extract features from: every file of the split was left out as unreadable")
    return torch.cat(feats), torch.cat(labels)
