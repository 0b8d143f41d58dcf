"""What an evaluation hands a person: one printed line in percent, and a JSON file beside the encoder.

Every evaluation names its accuracies the same way: "top1" and "top5", percent of the val images
(knn, linear_probe, finetune). In-training metrics in metrics.jsonl carry a prefix instead
(knn_top1, verdict_knn_top1), since one row there mixes several sources.

Where the JSON goes, for an encoder given as
    DIR/encoder.safetensors          DIR/<name>.json
    RUN_DIR (or an export folder)    RUN_DIR/<name>.json
    RUN_DIR/checkpoints/<tag>        RUN_DIR/<name>.<tag>.json  (a checkpoint folder is verified
                                     against its manifest: nothing is added inside it)
and with --output_dir DIR: DIR/<name>[.<tag>].json. <name> is the evaluation, with
"_random_init" for the random-init baseline, so the two numbers of a comparison sit side by side.
"""
from __future__ import annotations

import json
import os

TOP1, TOP5 = "top1", "top5"


def result_path(encoder: str, name: str, output_dir: str | None = None) -> str:
    """The JSON path of evaluation `name` (e.g. "knn", "knn_random_init") of `encoder` (see above)."""
    encoder = os.path.abspath(encoder)
    parent = os.path.dirname(encoder)
    if os.path.isfile(encoder):
        folder, stem = parent, name
    elif os.path.basename(parent) == "checkpoints":
        folder, stem = os.path.dirname(parent), f"{name}.{os.path.basename(encoder)}"
    else:
        folder, stem = encoder, name
    return os.path.join(output_dir or folder, f"{stem}.json")


def write_result(path: str, result: dict) -> None:
    """Write `result` as indented JSON, atomically, readable by everyone (0644)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def accuracy_line(label: str, result: dict) -> str:
    """'knn top-1 70.89%  top-5 97.33%' from a result with "top1" (and "top5")."""
    line = f"{label} top-1 {result[TOP1]:.2f}%"
    return line + (f"  top-5 {result[TOP5]:.2f}%" if TOP5 in result else "")


def images_note(images: dict[str, int], skipped: dict[str, int]) -> str:
    """'1347 train / 450 val images', then ', 1 unreadable file skipped (train 1, val 0)' when any was."""
    note = f"{images['train']} train / {images['val']} val images"
    if not any(skipped.values()):
        return note
    total = sum(skipped.values())
    return (f"{note}, {total} unreadable file{'s' if total > 1 else ''} skipped "
            f"(train {skipped['train']}, val {skipped['val']})")


def rounded(result: dict, digits: int = 4) -> dict:
    """Floats rounded for the JSON file (percent of at most a few 100k images needs no more)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in result.items()}


def open_encoder_and_splits(args):
    """(encoder, train_dir, val_dir) for an eval command's --encoder/--init/--seed/--data_path flags.
    DeepSpeed's consolidation chatter goes to stderr: the command's stdout is its result."""
    import contextlib
    import sys

    from img2vec.eval.common import load_encoder, split_dirs

    train_dir, val_dir = split_dirs(args.data_path, args.train, args.val)
    with contextlib.redirect_stdout(sys.stderr):
        encoder = load_encoder(args.encoder, args.init, args.seed, args.trust_checkpoint)
    return encoder, train_dir, val_dir


def publish(args, name: str, record: dict) -> int:
    """Write an eval command's record as <name>.json (or <name>_random_init.json) beside the encoder
    or in --output_dir, print where, and return the command's exit code."""
    import sys

    name = name if args.init == "pretrained" else f"{name}_random_init"
    path = result_path(args.encoder, name, args.output_dir)
    record = {**record, "encoder": os.path.abspath(args.encoder), "init": args.init, "seed": args.seed}
    try:
        write_result(path, record)
    except OSError as e:
        print(f"error: cannot write {path} ({e.strerror}): pass --output_dir DIR", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def eval_parser(description: str):
    """The options every evaluation command shares: the encoder, the data, the crop."""
    from img2vec.config import OneLineParser, option_names
    from img2vec.pretrained_cfg import EVAL_CROP_PCT

    parser = OneLineParser(description=description)
    parser.add_argument("--encoder", required=True,
                        help="encoder.safetensors, a run/export folder, or run/checkpoints/<tag>")
    parser.add_argument("--crop_pct", "--crop-pct", type=float, default=EVAL_CROP_PCT,
                        help="resize to image_size / crop_pct, center crop image_size (MAE, DINO: 0.875)")
    parser.add_argument("--trust_checkpoint", "--trust-checkpoint", action="store_true",
                        help="allow checkpoint pickles that would run code (only for files you trust)")
    parser.add_argument(*option_names("data_path"), help="ImageFolder root with train/ and val/")
    parser.add_argument("--train", help="train split (instead of --data_path)")
    parser.add_argument("--val", help="val split (instead of --data_path)")
    return parser
