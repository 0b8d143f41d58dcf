"""Process group set-up and cross-rank agreement, for every entry point."""
import os
import random
import warnings

import numpy as np
import torch


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_rank).

    Under the `deepspeed` launcher or torchrun the environment is already set; a plain
    `python img2vec/train.py` run becomes a one-process group on localhost. MPI discovery
    is off: without it DeepSpeed would look for mpi4py when RANK is missing.
    """
    import deepspeed

    # DeepSpeed's ZeRO calls torch.distributed collectives that torch marks deprecated: a FutureWarning
    # per call site and process, about code the user cannot change (pytest.ini filters them in the tests)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce op when the
    process group starts (30-70 s of C++ compiling on 2 cores, once per environment). Only
    DeepSpeed's inference all-reduce uses that op; training's collectives go through gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (a host sync: call it rarely)."""
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
