"""Export the encoder of a training checkpoint for timm: encoder.safetensors + encoder.json.

    python -m img2vec.export --encoder RUN_DIR --output_dir DIR                   # the run's latest checkpoint
    python -m img2vec.export --encoder RUN_DIR/checkpoints/step_000050 --output_dir DIR

Works on ZeRO-1/2/3 checkpoints of any world size (the fp32 master weights are
consolidated on CPU; no process group needed). Load the result in timm with one line:

    timm.models.VisionTransformer(**json.load(open("DIR/encoder.json"))["timm_kwargs"]).load_state_dict(
        safetensors.torch.load_file("DIR/encoder.safetensors"), strict=True)

encoder.json also carries timm's pretrained_cfg (input size, mean, std, crop, interpolation), so
`timm.data.resolve_data_config(pretrained_cfg=meta["pretrained_cfg"])` gives the matching transform.
Both files are written readable by everyone (0644): an export is meant to be shared.
"""
import contextlib
import json
import os
import sys

from img2vec.checkpoint import export_encoder
from img2vec.eval.common import checkpoint_student_state, find_checkpoint


def export_checkpoint(checkpoint: str, out_dir: str, trust: bool = False) -> str:
    """Write out_dir/encoder.safetensors (+ encoder.json) from a run or checkpoint folder; return its path."""
    ref = find_checkpoint(checkpoint)
    if ref is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint at {checkpoint}: pass a run folder (with "
                                f"checkpoints/latest) or run/checkpoints/<tag>")
    state, timm_kwargs = checkpoint_student_state(ref, trust)  # architecture from the run's config.yaml
    os.makedirs(out_dir, exist_ok=True)
    path = export_encoder(state, timm_kwargs, out_dir)
    complete_export(out_dir)
    return path


def complete_export(out_dir: str) -> None:
    """Give out_dir/encoder.json its timm pretrained_cfg if it lacks one, and both export files mode 0644
    (a umask of 077 would otherwise keep a shared export private). Idempotent."""
    from img2vec.pretrained_cfg import timm_pretrained_cfg

    meta_path = os.path.join(out_dir, "encoder.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if "pretrained_cfg" not in meta:
        meta["pretrained_cfg"] = timm_pretrained_cfg(meta["timm_kwargs"])
        tmp = f"{meta_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, meta_path)
    for name in ("encoder.safetensors", "encoder.json"):
        os.chmod(os.path.join(out_dir, name), 0o644)


def main(argv: list[str] | None = None) -> int:
    from img2vec.config import OneLineParser, option_names

    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="a run folder (latest checkpoint) or run/checkpoints/<tag>")
    parser.add_argument(*option_names("output_dir"), required=True,
                        help="folder for encoder.safetensors and encoder.json")
    parser.add_argument("--trust_checkpoint", "--trust-checkpoint", action="store_true",
                        help="allow checkpoint pickles that would run code (only for files you trust)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        print(f"error: --output_dir {args.output_dir} is a file: pass a folder", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation chatter: stdout is the path
            path = export_checkpoint(args.encoder, args.output_dir, args.trust_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
