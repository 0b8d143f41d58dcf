"""Checkpoints that survive kills, auto-resume that never loads a half-written or hostile one,
and the encoder export.

Layout of a run directory:
    output_dir/config.yaml                    the run config (as resolved)
    output_dir/ds_config.json                 the DeepSpeed config (as resolved)
    output_dir/checkpoints/step_000050/       one complete checkpoint:
        *.pt                                  DeepSpeed's files (model, optimizer, client state)
        img2vec_state.json                    step, config, engine facts, RNG states (plain JSON)
        manifest.json                         every file each rank wrote: size, sha256; written last
    output_dir/checkpoints/latest             tag of the newest complete checkpoint (informative)
    output_dir/encoder.safetensors, .json     fp32 encoder, timm VisionTransformer key names

A checkpoint is written as `step_X.partial/`, fsynced, given its manifest, and only then
renamed to `step_X/` (an atomic rename) and named in `latest` (written to a temporary file and
renamed). A kill at any moment leaves either the previous state or the new complete one.
Every reader (resume, export, evaluation) takes a checkpoint only if its manifest matches its
files byte for byte (sha256) and its pickles hold nothing but tensors and plain data; anything
else is skipped with a log line and left on disk, or refused in one line. Weights that are not
finite are never committed: the previous checkpoint stays the newest.
"""
import errno
import functools
import gc
import hashlib
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

from img2vec.config import Config

log = logging.getLogger("img2vec")

MANIFEST = "manifest.json"
# Manifest format 1: {file: size}. Format 2 adds "_format", "_world_size", and per file "_sha256"
# and "_rank" (which rank wrote it; null: rank 0's own files, the state).
MANIFEST_FORMAT = 2
STATE = "img2vec_state.json"
# Config keys that fix the shapes of the weights: a checkpoint written with other values
# cannot be loaded into this run.
ARCHITECTURE_KEYS = Config.architecture_keys()
# Engine facts a checkpoint records (save_checkpoint reads them off the engine): resuming under
# other values would change what a step means or could not load the optimizer's shards.
ENGINE_KEYS = {"world_size": "world size", "micro_batch": "micro-batch", "accum_steps": "accumulation steps",
               "zero_stage": "ZeRO stage"}
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that must not be loaded or could not be written; the message is one line
    saying what to do. A ValueError too, so every command's `except ValueError` prints it as one
    line and exits 2."""


class CheckpointSpaceError(CheckpointError):
    """The file system ran out of space while a checkpoint was written (the partial one is removed)."""


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


def _fsync_files(paths) -> None:
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _fsync_tree(path: str) -> None:
    _fsync_files(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def teacher_fingerprint(teacher_weights: str) -> str | None:
    """sha256 of a teacher weights file (cached per size and mtime); None for "random" / ""."""
    if not teacher_weights or teacher_weights == "random" or not os.path.isfile(teacher_weights):
        return None
    st = os.stat(teacher_weights)
    return _file_fingerprint(os.path.abspath(teacher_weights), st.st_size, st.st_mtime_ns)


def engine_facts(engine) -> dict:
    """What the optimizer's shards and the meaning of a step depend on (recorded at save)."""
    return {"world_size": dist.get_world_size(), "micro_batch": int(engine.train_micro_batch_size_per_gpu()),
            "accum_steps": int(engine.gradient_accumulation_steps()),
            "zero_stage": int(engine.zero_optimization_stage())}


# --- Writing -----------------------------------------------------------------------------------


def weights_finite(engine) -> bool:
    """Collective: True on every rank if every weight any rank holds is finite.

    Checks the module's parameters (under ZeRO-3 the shard in `ds_tensor`; the full tensor is
    gathered only for forward) and ZeRO's fp32 master partitions, the weights a checkpoint holds.
    """
    tensors = []
    for p in engine.module.parameters():
        shard = getattr(p, "ds_tensor", None)
        tensors.append(p.detach() if shard is None else shard)
    optimizer = getattr(engine, "optimizer", None)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",  # ZeRO-1/2, ZeRO-3
                 "fp32_groups_flat_partition"):  # bf16 without ZeRO
        tensors += [t for t in getattr(optimizer, name, None) or [] if torch.is_tensor(t)]
    device = next(engine.module.parameters()).device
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.numel():
            bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(device, torch.float32))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _disk_full(exc: BaseException, path: str, needed: int) -> bool:
    """Did `exc` come from a full file system? torch.save reports ENOSPC as a RuntimeError
    ("unexpected pos ..."), without the errno: then the free space left decides (called before
    the partial checkpoint is removed)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(path).free < max(needed, 1 << 20)
    except OSError:
        return False


def _space_needed(ckpt: str, engine) -> int:
    """Bytes the next checkpoint needs: the size of the newest complete one, else an estimate
    (16 bytes per parameter: weights, fp32 master, Adam's two moments)."""
    for tag in _step_tags(ckpt):
        path = os.path.join(ckpt, tag)
        if check_complete(path, checksums=False) is None:
            return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return 16 * n


class _RecordWrites:
    """Records every file DeepSpeed's checkpoint engine writes on this rank (the manifest's list
    of what each rank must have written)."""

    def __init__(self, engine):
        self.engine, self.paths = getattr(engine, "checkpoint_engine", None), []

    def __enter__(self):
        if self.engine is not None:
            original = self.engine.save

            def save(*args, **kwargs):
                path = kwargs.get("path", args[1] if len(args) > 1 else None)
                result = original(*args, **kwargs)
                if path is not None:
                    self.paths.append(os.path.abspath(path))
                return result

            self.engine.save = save  # an instance attribute: the class and other engines are untouched
        return self

    def __exit__(self, *exc):
        if self.engine is not None:
            self.engine.__dict__.pop("save", None)


def save_checkpoint(engine, output_dir: str, step: int, state: dict, keep_last: int = 0) -> str | None:
    """Collective (every rank calls it); keeps the newest `keep_last` complete checkpoints (0: all).

    Returns the committed directory, or None when the weights are not finite (nothing is written;
    the previous checkpoint stays the newest). A full file system raises CheckpointSpaceError on
    every rank after the partial directory is removed.
    """
    ckpt, tag = checkpoint_dir(output_dir), step_tag(step)
    final, partial = os.path.join(ckpt, tag), os.path.join(ckpt, tag + ".partial")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not weights_finite(engine):
        if rank == 0:
            log.error("step %d: the weights are not finite (NaN/inf): checkpoint not written; the newest one "
                      "stays %s", step, newest_complete(output_dir) or "(none)")
        return None
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-write
    dist.barrier()
    failure = None
    with _RecordWrites(engine) as written:
        try:
            engine.save_checkpoint(ckpt, tag=tag + ".partial", client_state={"step": step}, save_latest=False)
            _fsync_files(written.paths)  # each rank flushes what it wrote before anyone commits
            mine = {os.path.basename(p): {"size": os.path.getsize(p), "sha256": sha256_file(p), "rank": rank}
                    for p in written.paths}
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others hang
            failure, mine = e, {}
    _raise_if_any_failed(failure, engine, ckpt, partial, step)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        try:
            _commit(engine, ckpt, tag, partial, final, step, state, gathered, keep_last)
        except Exception as e:  # noqa: BLE001
            failure = e
    _raise_if_any_failed(failure, engine, ckpt, partial, step)
    return final


def _raise_if_any_failed(failure, engine, ckpt: str, partial: str, step: int) -> None:
    flags = torch.tensor([float(failure is not None)])
    if dist.get_world_size() > 1:
        flags = flags.to(next(engine.module.parameters()).device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not flags.item():
        return
    needed = _space_needed(ckpt, engine)
    full = failure is not None and _disk_full(failure, ckpt, needed)
    if full:  # the traceback's frames hold the half-written file open: its space frees only when it closes
        seen = failure
        while seen is not None:
            seen.__traceback__ = None
            seen = seen.__cause__ or seen.__context__
        gc.collect()
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # give the space back; the previous checkpoint stays
    if full:
        free = shutil.disk_usage(ckpt).free if os.path.isdir(ckpt) else 0
        raise CheckpointSpaceError(f"no space left on {ckpt}: {needed / 2**20:.0f} MB needed for the checkpoint of "
                                   f"step {step}, {free / 2**20:.0f} MB free; free some space (or set keep_last) and "
                                   f"rerun to resume from the previous checkpoint") from None
    if failure is not None:
        raise failure
    raise CheckpointError(f"another rank failed to write the checkpoint of step {step} (see its log); "
                          f"rerun to resume from the previous checkpoint")


def _commit(engine, ckpt: str, tag: str, partial: str, final: str, step: int, state: dict,
            gathered: list[dict], keep_last: int) -> None:
    """Rank 0: state file, manifest, fsync, the atomic rename, `latest`, pruning."""
    teacher = teacher_fingerprint(state.get("config", {}).get("teacher_weights", ""))
    _write_atomic(os.path.join(partial, STATE), json.dumps(
        {**state, "step": step, "engine": engine_facts(engine), "teacher_sha256": teacher, "rng": rng_states()}))
    files = {name: entry for per_rank in gathered for name, entry in per_rank.items()}
    for name in sorted(os.listdir(partial)):  # the state file, and anything not written through DeepSpeed
        full = os.path.join(partial, name)
        if name not in files and name != MANIFEST and os.path.isfile(full):
            files[name] = {"size": os.path.getsize(full), "sha256": sha256_file(full), "rank": None}
    names = sorted(files)
    manifest = {**{n: files[n]["size"] for n in names}, "_format": MANIFEST_FORMAT, "_world_size": len(gathered),
                "_sha256": {n: files[n]["sha256"] for n in names}, "_rank": {n: files[n]["rank"] for n in names}}
    _write_atomic(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
    _fsync_tree(partial)
    if os.path.exists(final):  # an older, damaged copy of this step: keep it, out of the way
        os.replace(final, f"{final}.damaged-{int(time.time())}")
    os.replace(partial, final)  # the commit point
    _write_atomic(os.path.join(ckpt, "latest"), tag)
    _prune(ckpt, keep_last, tag)


def _step_tags(ckpt: str) -> list[str]:
    """Step directories inside `ckpt`, newest first. Partial and damaged ones do not match the
    pattern; a symlink that leads out of `ckpt` is not one of this run's checkpoints."""
    if not os.path.isdir(ckpt):
        return []
    real = os.path.realpath(ckpt)
    tags = [name for name in os.listdir(ckpt) if _STEP_DIR.match(name) and os.path.isdir(os.path.join(ckpt, name))
            and os.path.dirname(os.path.realpath(os.path.join(ckpt, name))) == real]
    return sorted(tags, key=lambda t: int(_STEP_DIR.match(t).group(1)), reverse=True)


_complete_tags = _step_tags  # the name older code imports


def _prune(ckpt: str, keep_last: int, committed: str) -> None:
    """Delete complete checkpoints older than the one just committed beyond the newest
    `keep_last` (the committed one counts). Incomplete or damaged folders are never counted nor
    deleted, and nothing newer than the committed one is touched."""
    if keep_last <= 0:
        return
    newest = int(_STEP_DIR.match(committed).group(1))
    older = [t for t in _step_tags(ckpt) if int(_STEP_DIR.match(t).group(1)) < newest
             and check_complete(os.path.join(ckpt, t), checksums=False) is None]
    for tag in older[keep_last - 1:]:
        shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)


# --- Checking ----------------------------------------------------------------------------------


def _safe_globals() -> list:
    """DeepSpeed's own classes that appear in its checkpoints: allowed by the safe unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _read_manifest(path: str) -> tuple[dict[str, int], dict[str, str] | None]:
    """(sizes, sha256s) of the manifest: {file: bytes} at the top level (as format 1 had it), and
    format 2's "_sha256" (None for format 1)."""
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError("manifest is not an object")
    sizes = {name: int(size) for name, size in manifest.items() if not name.startswith("_")}
    return sizes, (dict(manifest["_sha256"]) if manifest.get("_format") == MANIFEST_FORMAT else None)


def check_complete(path: str, checksums: bool = True) -> str | None:
    """None if every file the manifest names (each rank's writes, the state) is there with its
    size, the state names this folder's step, and (checksums=True) every file matches its sha256;
    else what is wrong. Sizes only is cheap: pruning and finding the newest use it."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return "incomplete: no manifest.json (the write was interrupted)"
    try:
        sizes, _ = _read_manifest(path)
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest or state ({type(e).__name__})"
    for name, size in sizes.items():
        full = os.path.join(path, name)
        if name == MANIFEST or os.sep in name or name in (".", ".."):
            continue
        if not os.path.isfile(full):
            return f"file {name} is missing"
        if os.path.getsize(full) != size:
            return f"file {name} has {os.path.getsize(full)} bytes, the manifest says {size} (truncated)"
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if match and isinstance(state, dict) and state.get("step") != int(match.group(1)):
        return f"its state says step {state.get('step')!r}, the folder is step {int(match.group(1))}"
    return check_checksums(path) if checksums else None


def check_checksums(path: str) -> str | None:
    """None if every file of a format-2 manifest matches its sha256 (a same-size corruption,
    e.g. flipped bytes in an optimizer file, passes the size check); else which one does not."""
    try:
        sizes, sha256 = _read_manifest(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    if sha256 is None:
        return None  # format 1: sizes only
    for name in sizes:
        if name != MANIFEST and sha256_file(os.path.join(path, name)) != sha256.get(name):
            return f"file {name} does not match its sha256 in the manifest (corrupted)"
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
                    f"rerun with --trust_checkpoint") from None
            return f"file {name} does not unpickle ({type(e).__name__})"
    return None


def verify_checkpoint(path: str, trust: bool = False) -> None:
    """Raise CheckpointError (one line) unless `path` is a complete checkpoint whose pickles are
    safe (trust=True skips only the pickle check). Every reader calls this before unpickling."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint folder")
    problem = check_complete(path, checksums=False) or (None if trust else check_safe(path)) or check_checksums(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not loadable: {problem}; pass another one from "
                              f"{os.path.dirname(os.path.abspath(path))}")


def newest_complete(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run (sizes checked; readers verify fully), or
    None. `latest` is not followed: it is a plain file anyone can point anywhere."""
    ckpt = checkpoint_dir(output_dir)
    for tag in _step_tags(ckpt):
        if check_complete(os.path.join(ckpt, tag), checksums=False) is None:
            return os.path.join(ckpt, tag)
    return None


def _compatibility(path: str, state: dict, engine, config: dict) -> str | None:
    """None if this run may continue the checkpoint's; else one line saying what changed."""
    theirs = {k: state["config"].get(k) for k in ARCHITECTURE_KEYS}
    ours = {k: config.get(k) for k in ARCHITECTURE_KEYS}
    if theirs != ours:
        diff = ", ".join(f"{k}={theirs[k]} (this run: {ours[k]})" for k in ARCHITECTURE_KEYS if theirs[k] != ours[k])
        return f"checkpoint {path} was written for another model: {diff}; use a new output_dir or the same settings"
    changes = []
    facts = state.get("engine")
    if isinstance(facts, dict):  # checkpoints written before engine facts were recorded lack them
        now = engine_facts(engine)
        changes += [f"{label} {facts.get(k)} -> {now[k]}" for k, label in ENGINE_KEYS.items()
                    if k in facts and facts[k] != now[k]]
    if "teacher_sha256" in state:
        before, after = state["config"].get("teacher_weights") or "random", config.get("teacher_weights") or "random"
        now_sha = teacher_fingerprint(config.get("teacher_weights", ""))
        if before != after or state["teacher_sha256"] != now_sha:
            changes.append(f"teacher weights {before} -> {after}" if before != after
                           else f"teacher weights file {after} changed (sha256 {str(state['teacher_sha256'])[:12]} "
                                f"-> {str(now_sha)[:12]})")
    if changes:
        return (f"checkpoint {path} was written with other settings: {', '.join(changes)}; resume with the same "
                f"DeepSpeed config, number of processes and teacher, or start a new output_dir")
    return None


def resume_checkpoint(engine, output_dir: str, config: dict, trust: bool) -> dict | None:
    """Load the newest complete, compatible checkpoint of output_dir; its state, or None.

    Incomplete, corrupt (sha256) or inconsistent checkpoints are skipped with a warning and left
    on disk. A checkpoint of another architecture, micro-batch, accumulation, ZeRO stage, world
    size or teacher stops the run (CheckpointError): nothing is loaded or written. The returned
    state carries "path": the folder it came from (export from there, never from a tag built
    out of the state's numbers).
    """
    ckpt = checkpoint_dir(output_dir)
    tags = _step_tags(ckpt)
    if not tags:
        if os.path.isdir(ckpt):
            log.info("no complete checkpoint in %s: starting from step 0", ckpt)
        return None
    for tag in tags:
        path = os.path.join(ckpt, tag)
        problem = check_complete(path, checksums=False)
        if problem is None:
            with open(os.path.join(path, STATE)) as f:
                state = json.load(f)
            refusal = _compatibility(path, state, engine, config)
            if refusal is not None:
                raise CheckpointError(refusal)
            # The pickle check first: it never runs code, and a planted payload is worth a refusal
            # (exit 2), not a quiet skip.
            problem = (None if trust else check_safe(path)) or check_checksums(path)
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
            return {**state, "path": path}
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    log.warning("no loadable checkpoint in %s: starting from step 0", ckpt)
    return None


# --- Reading the weights back --------------------------------------------------------------------


def frozen_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that never train (fixed position embeddings); take them
    before ZeRO-3 shards the model."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if not p.requires_grad}


def load_fp32_state_dict(path: str, frozen: dict[str, torch.Tensor], trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict from one checkpoint folder (ZeRO-1/2/3, the fp32 master
    weights), after verify_checkpoint: DeepSpeed's consolidation unpickles with
    weights_only=False, so nothing unverified reaches it.

    `frozen` (from frozen_parameters: the fixed sin-cos tables, exact in fp32) wins over the
    checkpoint: DeepSpeed stores frozen parameters only in the engine's precision (a bf16 copy
    under bf16) and leaves them out of ZeRO-1 checkpoints altogether.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = os.path.normpath(path)
    verify_checkpoint(path, trust)
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    return {**state, **frozen}


def consolidated_fp32_state_dict(output_dir: str, tag: str, frozen: dict[str, torch.Tensor],
                                 trust: bool = False) -> dict[str, torch.Tensor]:
    """load_fp32_state_dict of output_dir/checkpoints/<tag>; the tag is a folder name, never a path."""
    if not tag or os.sep in tag or (os.altsep and os.altsep in tag) or tag in (".", ".."):
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (a folder name under {checkpoint_dir(output_dir)})")
    return load_fp32_state_dict(os.path.join(checkpoint_dir(output_dir), tag), frozen, trust)


# --- Export ------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A .safetensors file whose bytes depend only on the tensors and metadata: names and header
    keys sorted (safetensors' own writer orders the metadata by a randomly seeded hash map, so
    two exports of the same weights differ). Written to a temporary name, then renamed."""
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # never leave a half-written export under the real name


def export_encoder(student_state: dict[str, torch.Tensor], timm_kwargs: dict, out_dir: str) -> str:
    """Write encoder.safetensors (+ encoder.json) loadable by timm's VisionTransformer; the same
    weights give the same bytes.

    Load it in timm with:
        VisionTransformer(**json.load(open("encoder.json"))["timm_kwargs"]).load_state_dict(
            safetensors.torch.load_file("encoder.safetensors"), strict=True)
    """
    prefix = "encoder."
    encoder = {k[len(prefix):]: v.float().contiguous() for k, v in student_state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError("no encoder.* weights in the checkpoint: is this an img2vec run?")
    path = os.path.join(out_dir, "encoder.safetensors")
    save_safetensors(encoder, path, {"format": "pt", "library": "timm"})
    from img2vec.pretrained_cfg import timm_pretrained_cfg  # timm.data.resolve_data_config reads it

    meta_path = os.path.join(out_dir, "encoder.json")
    _write_atomic(meta_path, json.dumps(
        {"timm_class": "timm.models.vision_transformer.VisionTransformer", "timm_kwargs": timm_kwargs,
         "pretrained_cfg": timm_pretrained_cfg(timm_kwargs)}, indent=2, sort_keys=True))
    for p in (path, meta_path):
        os.chmod(p, 0o644)  # an export is for sharing; a private umask would leave it 0600
    return path
