"""Checkpoints through the DeepSpeed engine, auto-resume, and the encoder export.

Layout of a run directory:
    output_dir/config.yaml              the run config (as resolved)
    output_dir/ds_config.json           the DeepSpeed config (as resolved)
    output_dir/checkpoints/step_000050/ DeepSpeed checkpoint (model, optimizer, client state)
    output_dir/checkpoints/latest       tag of the newest complete checkpoint (written by DeepSpeed last)
    output_dir/encoder.safetensors      fp32 encoder, timm VisionTransformer key names
    output_dir/encoder.json             timm model arguments for that file
"""
import json
import logging
import os

import torch

log = logging.getLogger("img2vec")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict) -> str:
    """Collective: every rank calls it. DeepSpeed writes `latest` after the files."""
    engine.save_checkpoint(checkpoint_dir(output_dir), tag=step_tag(step), client_state=client_state)
    return os.path.join(checkpoint_dir(output_dir), step_tag(step))


def resume_checkpoint(engine, output_dir: str) -> dict | None:
    """Load the latest checkpoint of output_dir into the engine; its client state, or None."""
    ckpt = checkpoint_dir(output_dir)
    if not os.path.isfile(os.path.join(ckpt, "latest")):
        return None
    path, client_state = engine.load_checkpoint(ckpt)
    if path is None:
        raise RuntimeError(f"could not load the checkpoint named in {ckpt}/latest; "
                           f"delete that file to start over or pass --resume false")
    log.info("resumed from %s (step %d)", path, client_state["step"])
    return client_state


def frozen_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that never train (fixed position embeddings); take them
    before ZeRO-3 shards the model."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if not p.requires_grad}


def consolidated_fp32_state_dict(output_dir: str, tag: str, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict from a ZeRO-1/2/3 checkpoint (the fp32 master weights).

    DeepSpeed 0.19's zero_to_fp32 leaves frozen parameters out of ZeRO-1 checkpoints, so
    `frozen` (from frozen_parameters) fills whatever the checkpoint lacks.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir(output_dir), tag=tag)
    return {**frozen, **state}


def export_encoder(student_state: dict[str, torch.Tensor], timm_kwargs: dict, out_dir: str) -> str:
    """Write encoder.safetensors (+ encoder.json) loadable by timm's VisionTransformer.

    Load it in timm with:
        VisionTransformer(**json.load(open("encoder.json"))["timm_kwargs"]).load_state_dict(
            safetensors.torch.load_file("encoder.safetensors"), strict=True)
    """
    from safetensors.torch import save_file

    prefix = "encoder."
    encoder = {k[len(prefix):]: v.float().contiguous() for k, v in student_state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError("no encoder.* weights in the checkpoint: is this an img2vec run?")
    path = os.path.join(out_dir, "encoder.safetensors")
    tmp = path + ".tmp"
    save_file(encoder, tmp, metadata={"format": "pt", "library": "timm"})
    os.replace(tmp, path)  # never leave a half-written export under the real name
    with open(os.path.join(out_dir, "encoder.json"), "w") as f:
        json.dump({"timm_class": "timm.models.vision_transformer.VisionTransformer",
                   "timm_kwargs": timm_kwargs}, f, indent=2)
    return path
