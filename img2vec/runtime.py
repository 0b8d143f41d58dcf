"""What every DeepSpeed entry point sets up the same way: the process group, the DeepSpeed JSON
with the run config's batch overrides, device, precision and seeds; and the teacher and student
built from a run config in one place."""
import dataclasses
import gc
import logging
import os
import sys
from dataclasses import dataclass

import torch

from img2vec.config import Config, ConfigError
from img2vec.distributed import init_distributed, seed_everything
from img2vec.ds_config import DsConfigError, ds_precision, load_ds_config

log = logging.getLogger("img2vec")


@dataclass
class Runtime:
    """This process's place in the run and the engine's settings."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # of the student's inputs: bf16 / fp16 / fp32, from the DeepSpeed JSON
    ds_config: dict  # complete: micro-batch, accumulation and train_batch_size agree
    micro_batch: int  # images per process per micro-step
    accum_steps: int  # micro-steps per optimizer step
    global_batch: int  # images per optimizer step, all ranks

    def log_line(self) -> str:
        return (f"world {self.world_size} x micro {self.micro_batch} x accum {self.accum_steps} = "
                f"{self.global_batch} images/step")


def resolve_batch(ds_config_path: str, cfg, world_size: int):
    """Read the DeepSpeed JSON; the run config's batch_size / accum_iter override its batch keys
    when > 0. Returns (complete DeepSpeed config, cfg with batch_size and accum_iter resolved, so
    the saved config says what ran). A bad JSON raises ConfigError (one line)."""
    try:
        ds_config = load_ds_config(ds_config_path, world_size, cfg.batch_size, cfg.accum_iter)
    except (OSError, ValueError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    micro_batch, accum_steps = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    return ds_config, dataclasses.replace(cfg, batch_size=micro_batch, accum_iter=accum_steps)


def launch_world_size() -> int:
    """The world size the launcher announced (1 for a plain python run), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_runtime(ds_config_path: str, cfg):
    """Join the process group, resolve the DeepSpeed JSON (see resolve_batch), pick device and
    precision, seed. Returns (runtime, cfg with its batch keys resolved)."""
    rank, world_size, local_rank = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ds_config, cfg = resolve_batch(ds_config_path, cfg, world_size)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    seed_everything(cfg.seed)
    rt = Runtime(rank, world_size, local_rank, device, ds_precision(ds_config), ds_config, cfg.batch_size,
                 cfg.accum_iter, ds_config["train_batch_size"])
    return rt, cfg


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime):
    """DeepSpeed engine around `model`; returns (engine, the optimizer DeepSpeed wraps it in).
    A JSON that DeepSpeed itself rejects (a removed or misspelled key, a bad value, an option that
    needs DeepSpeed's own optimizer) raises DsConfigError with DeepSpeed's reason, in one line."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfigError
    from deepspeed.runtime.zero.utils import ZeRORuntimeException
    from pydantic import ValidationError

    try:
        engine, wrapped, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=rt.ds_config)
    except ValidationError as e:  # DeepSpeed's config sections are pydantic models
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or e.title}: {err['msg']}" for err in e.errors())
        raise DsConfigError(f"DeepSpeed rejected the DeepSpeed JSON ({e.title}): {reasons}") from None
    except (DeepSpeedConfigError, ZeRORuntimeException) as e:
        hint = (" (img2vec passes its own torch AdamW: remove the offload, or set \"zero_force_ds_cpu_optimizer\": "
                "false to offload it as it is)" if "ZeRO-Offload" in str(e) else "")
        raise DsConfigError(f"DeepSpeed rejected the DeepSpeed JSON: {' '.join(str(e).split())}{hint}") from None
    return engine, wrapped


def build_teacher(cfg: Config):
    """The frozen teacher of a pretraining config (seeded: a random teacher is the same every time);
    img2vec.teacher.build_teacher picks a weight-free one (pixels, hog) or a timm model."""
    from img2vec.teacher import build_teacher as teacher_by_name

    return teacher_by_name(cfg.teacher, cfg.teacher_stage, cfg.teacher_weights, cfg.resolved_patch_size,
                           cfg.image_size, seed=cfg.seed, fold_bn=cfg.teacher_fold_bn)


def build_student_from_config(cfg: Config, out_channels: int, attn_impl: str = "sdpa"):
    """The student of a pretraining config; out_channels C = the teacher's channels."""
    from img2vec.vit import build_student

    return build_student(cfg.model, cfg.image_size, cfg.resolved_patch_size, out_channels, cfg.decoder_depth,
                         cfg.decoder_width, cfg.decoder_heads, attn_impl, cfg.grad_ckpt,
                         drop_path=cfg.drop_path)


def report_user_error(err: Exception) -> int:
    """Print one line for a mistake the user can fix and return exit code 2; re-raise anything
    else: a bug keeps its traceback."""
    import sys

    from dataloading import DataError
    from img2vec.checkpoint import CheckpointError
    from img2vec.fastpaths import FastPathError
    from img2vec.run_lock import RunLockedError
    from img2vec.teacher import TeacherWeightsError

    kinds = [("config", ConfigError), ("data", DataError), ("output_dir", RunLockedError),
             ("checkpoint", CheckpointError), ("file", FileNotFoundError), ("teacher_weights", TeacherWeightsError),
             ("fast path", FastPathError)]
    kind = next((name for name, t in kinds if isinstance(err, t)), None)
    if kind is None:
        raise err
    print(f"{kind} error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def entry_parser(config_cls, description: str):
    """The parser of a DeepSpeed entry point: every key of config_cls, plus the engine's JSON."""
    from img2vec.config import build_parser

    parser = build_parser(config_cls, description)
    parser.add_argument("--ds_config", "--ds-config", required=True,
                        help="DeepSpeed JSON (engine: precision, ZeRO, clipping; batch unless batch_size/accum_iter)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser


def entry_config(config_cls, description: str, argv: list[str] | None, finish=lambda cfg: cfg):
    """Parse a DeepSpeed entry point's command line into (ds_config path, cfg): flags over YAML over
    defaults, then finish(cfg); the JSON is read and checked against it before anything slow.
    Returns None when --print_config printed the resolved config instead."""
    from img2vec.config import config_from_args, print_config

    args = entry_parser(config_cls, description).parse_args(argv)
    cfg = finish(config_from_args(config_cls, args))
    resolved = resolve_batch(args.ds_config, cfg, launch_world_size())[1]
    if args.print_config:
        print_config(resolved)
        return None
    return args.ds_config, cfg


def end_start_up() -> None:
    """Called by an entry point once the engine is built and the run resumed.

    Its `__main__` turns the cycle collector off for start-up: importing torch, DeepSpeed, DALI and
    timm otherwise re-scans the growing module graph again and again, ~2 s of a 7 s start-up on a
    2-core CPU. Here: one collection, then freeze what is left (modules, models, engine) so that
    later collections skip it, and collect as usual from now on. Nothing to do when the collector
    is on (main() called in a process that did not turn it off, e.g. a test).
    """
    if gc.isenabled():
        return
    gc.collect()
    gc.freeze()
    gc.enable()


def exit_process(code: int) -> None:
    """sys.exit(code) for an entry point's `__main__`, minus ~2 s of interpreter teardown.

    At exit Python garbage-collects every object left, and torch, DeepSpeed, DALI, timm and
    matplotlib leave a large graph: 1.9 s of a 2-core machine's time (0.4 s with the graph
    frozen). Everything the run writes is closed before main() returns; atexit handlers (the run
    lock) and plain reference counting still run, only the cycle collector skips the frozen objects.
    """
    gc.freeze()
    sys.exit(code)
