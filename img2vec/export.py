"""Export the encoder of a training checkpoint for timm: encoder.safetensors + encoder.json.

    python -m img2vec.export --encoder RUN_DIR --output_dir DIR                   # the run's latest checkpoint
    python -m img2vec.export --encoder RUN_DIR/checkpoints/step_000050 --output_dir DIR

Works on ZeRO-1/2/3 checkpoints of any world size (the fp32 master weights are
consolidated on CPU; no process group needed). Load the result in timm with one line:

    timm.models.VisionTransformer(**json.load(open("DIR/encoder.json"))["timm_kwargs"]).load_state_dict(
        safetensors.torch.load_file("DIR/encoder.safetensors"), strict=True)
"""
import os
import sys

from img2vec.checkpoint import export_encoder
from img2vec.eval.common import checkpoint_student_state, find_checkpoint


def export_checkpoint(checkpoint: str, out_dir: str) -> str:
    """Write out_dir/encoder.safetensors (+ encoder.json) from a run or checkpoint folder; return its path."""
    ref = find_checkpoint(checkpoint)
    if ref is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint at {checkpoint}: pass a run folder (with "
                                f"checkpoints/latest) or run/checkpoints/<tag>")
    state, timm_kwargs = checkpoint_student_state(ref)  # architecture from the run's config.yaml
    os.makedirs(out_dir, exist_ok=True)
    return export_encoder(state, timm_kwargs, out_dir)


def main(argv: list[str] | None = None) -> int:
    from img2vec.config import OneLineParser, option_names

    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="a run folder (latest checkpoint) or run/checkpoints/<tag>")
    parser.add_argument(*option_names("output_dir"), required=True,
                        help="folder for encoder.safetensors and encoder.json")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        print(f"error: --output_dir {args.output_dir} is a file: pass a folder", file=sys.stderr)
        return 2
    try:
        path = export_checkpoint(args.encoder, args.output_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
