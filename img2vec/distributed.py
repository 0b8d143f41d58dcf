"""Process group set-up and cross-rank agreement, for every entry point."""
import os
import random

import numpy as np
import torch


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns (rank, world_size, local_rank).

    Under the `deepspeed` launcher or torchrun the environment is already set; a plain
    `python img2vec/train.py` run becomes a one-process group on localhost. MPI discovery
    is off: without it DeepSpeed would look for mpi4py when RANK is missing.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _prepare_cpu_comm_op(int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def _prepare_cpu_comm_op(world_size: int, local_rank: int) -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at start-up (30-60 s).

    One process has nothing to all-reduce: the op is not built (gloo's collectives still work).
    Several: it is built once per environment into a cache of ours, keyed by the versions that
    change its binary, so other environments cannot make it rebuild; the log says so first.
    """
    import sys

    import deepspeed
    import deepspeed.ops

    name = "deepspeed_shm_comm"
    if world_size == 1:
        deepspeed.ops.__compatible_ops__[name] = False
        return
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from dataloading.sample_data import cache_root

        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-ds{deepspeed.__version__}"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root(None) / "torch_extensions" / tag)
    built = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], name, f"{name}.so")
    if local_rank == 0 and deepspeed.ops.__compatible_ops__.get(name) and not os.path.exists(built):
        print(f"building DeepSpeed's CPU communication op once for this environment (30-60 s) "
              f"into {os.environ['TORCH_EXTENSIONS_DIR']}", file=sys.stderr, flush=True)


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (a host sync: call it rarely)."""
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
