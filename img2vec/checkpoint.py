"""Checkpoints that survive kills, auto-resume that never loads a half-written one, and the
encoder export.

Layout of a run directory:
    output_dir/config.yaml                    the run config (as resolved)
    output_dir/ds_config.json                 the DeepSpeed config (as resolved)
    output_dir/checkpoints/step_000050/       one complete checkpoint:
        *.pt                                  DeepSpeed's files (model, optimizer, client state)
        img2vec_state.json                    step, config, RNG states (plain JSON: no pickle)
        manifest.json                         every file's size; written last
    output_dir/checkpoints/latest             tag of the newest complete checkpoint
    output_dir/encoder.safetensors, .json     fp32 encoder, timm VisionTransformer key names

A checkpoint is written as `step_X.partial/`, fsynced, given its manifest, and only then
renamed to `step_X/` (an atomic rename) and named in `latest` (written to a temporary file and
renamed). A kill at any moment leaves either the previous state or the new complete one.
Resume takes the newest directory whose manifest matches its files; anything else is skipped
with a log line and left on disk.
"""
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("img2vec")

MANIFEST = "manifest.json"
STATE = "img2vec_state.json"
# Config keys that fix the shapes of the weights: a checkpoint written with other values
# cannot be loaded into this run.
ARCHITECTURE_KEYS = ("model", "patch_size", "image_size", "decoder_depth", "decoder_width",
                     "decoder_heads", "teacher", "teacher_stage")
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded; the message is one line saying what to do."""


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def rng_states() -> dict:
    """Python, NumPy and torch RNG states as JSON-able lists (no pickle in the checkpoint)."""
    np_state = np.random.get_state()
    states = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
              "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def restore_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((states["numpy"][0], np.array(states["numpy"][1], dtype=np.uint32), *states["numpy"][2:]))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, output_dir: str, step: int, state: dict, keep_last: int = 0) -> str:
    """Collective (every rank calls it); keeps the newest `keep_last` (0: all). Returns the directory."""
    ckpt, tag = checkpoint_dir(output_dir), step_tag(step)
    final, partial = os.path.join(ckpt, tag), os.path.join(ckpt, tag + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-write
    dist.barrier()
    engine.save_checkpoint(ckpt, tag=tag + ".partial", client_state={"step": step}, save_latest=False)
    _fsync_tree(partial)  # each rank flushes what it wrote before anyone commits
    dist.barrier()
    if rank == 0:
        _write_atomic(os.path.join(partial, STATE), json.dumps({**state, "step": step, "rng": rng_states()}))
        sizes = {name: os.path.getsize(os.path.join(partial, name)) for name in sorted(os.listdir(partial))}
        _write_atomic(os.path.join(partial, MANIFEST), json.dumps(sizes, indent=1))
        _fsync_tree(partial)
        if os.path.exists(final):  # an older, damaged copy of this step: keep it, out of the way
            os.replace(final, f"{final}.damaged-{int(time.time())}")
        os.replace(partial, final)  # the commit point
        _write_atomic(os.path.join(ckpt, "latest"), tag)
        _prune(ckpt, keep_last)
    dist.barrier()
    return final


def _complete_tags(ckpt: str) -> list[str]:
    """Step directories, newest first (partial and damaged ones do not match the pattern)."""
    if not os.path.isdir(ckpt):
        return []
    tags = [name for name in os.listdir(ckpt) if _STEP_DIR.match(name) and os.path.isdir(os.path.join(ckpt, name))]
    return sorted(tags, key=lambda t: int(_STEP_DIR.match(t).group(1)), reverse=True)


def _prune(ckpt: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for tag in _complete_tags(ckpt)[keep_last:]:
        shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)


def _safe_globals() -> list:
    """DeepSpeed's own classes that appear in its checkpoints: allowed by the safe unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_complete(path: str) -> str | None:
    """None if every file the manifest names is there with its size; else what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return "incomplete: no manifest.json (the write was interrupted)"
    try:
        with open(manifest_path) as f:
            sizes = json.load(f)
        with open(os.path.join(path, STATE)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest or state ({type(e).__name__})"
    for name, size in sizes.items():
        full = os.path.join(path, name)
        if name == MANIFEST:
            continue
        if not os.path.isfile(full):
            return f"file {name} is missing"
        if os.path.getsize(full) != size:
            return f"file {name} has {os.path.getsize(full)} bytes, the manifest says {size} (truncated)"
    return None


def check_safe(path: str) -> str | None:
    """None if every .pt file of the checkpoint unpickles with torch.load(weights_only=True)
    plus DeepSpeed's few plain classes; else why not. A file that would run code raises
    CheckpointError here, before DeepSpeed (which loads with weights_only=False) opens it."""
    for name in sorted(os.listdir(path)):
        if not name.endswith(".pt"):
            continue
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure to unpickle safely
            reason = " ".join(str(e).split())
            if "Unsupported global" in reason or "weights_only" in reason.lower():
                found = re.search(r"GLOBAL ([\w.]+)", reason)
                raise CheckpointError(
                    f"{path}/{name} holds pickled objects outside the safe set "
                    f"({found.group(1) if found else 'unknown'}); not loading it. If you trust its source, "
                    f"rerun with --trust_checkpoint true") from None
            return f"file {name} does not unpickle ({type(e).__name__})"
    return None


def resume_checkpoint(engine, output_dir: str, config: dict, trust: bool) -> dict | None:
    """Load the newest complete, compatible checkpoint of output_dir; its state, or None.

    Incomplete or corrupt checkpoints are skipped with a warning and left on disk. A
    checkpoint of another architecture stops the run (CheckpointError): nothing is written.
    """
    ckpt = checkpoint_dir(output_dir)
    tags = _complete_tags(ckpt)
    if not tags:
        if os.path.isdir(ckpt):
            log.info("no complete checkpoint in %s: starting from step 0", ckpt)
        return None
    for tag in tags:
        path = os.path.join(ckpt, tag)
        problem = check_complete(path)
        if problem is None:
            with open(os.path.join(path, STATE)) as f:
                state = json.load(f)
            theirs = {k: state["config"].get(k) for k in ARCHITECTURE_KEYS}
            ours = {k: config[k] for k in ARCHITECTURE_KEYS}
            if theirs != ours:
                diff = ", ".join(f"{k}={theirs[k]} (this run: {ours[k]})" for k in ARCHITECTURE_KEYS if theirs[k] != ours[k])
                raise CheckpointError(f"checkpoint {path} was written for another model: {diff}; "
                                      f"use a new output_dir or the same settings")
            problem = None if trust else check_safe(path)
        if problem is None:
            # Past the checks a failed load may leave the engine half-loaded: stop, don't fall back.
            try:
                loaded, _ = engine.load_checkpoint(ckpt, tag=tag)
            except Exception as e:  # noqa: BLE001
                loaded, problem = None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {path} ({problem or 'no files'}); "
                                      f"move it out of {ckpt} to resume from the previous one")
            restore_rng_states(state["rng"])
            log.info("resumed from %s (step %d)", path, state["step"])
            return state
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    log.warning("no loadable checkpoint in %s: starting from step 0", ckpt)
    return None


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
