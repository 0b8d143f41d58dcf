"""`python -m img2vec.export`: a training checkpoint -> encoder.safetensors + encoder.json that timm loads
strictly and that computes our encoder's features (fp32, 1e-5)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from eval_helpers import PROOF_STEPS, digits_run
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from train_helpers import REPO

from img2vec.checkpoint import step_tag
from img2vec.eval.common import load_encoder
from img2vec.export import export_checkpoint


def export(*args: str) -> subprocess.CompletedProcess:
    """`python -m img2vec.export` in a real process (the e2e test's path from the command line)."""
    return subprocess.run([sys.executable, "-m", "img2vec.export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def export_main(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of the command's main(args) in this process, as `sys.exit(main())` exits."""
    from img2vec.export import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    return 0 if code is None else code, capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_export_loads_strictly_into_timm_with_our_features(tmp_path_factory, tmp_path):
    run = digits_run(tmp_path_factory)
    proc = export("--encoder", str(run), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(tmp_path / "out" / "encoder.safetensors"))
    meta = json.loads((tmp_path / "out" / "encoder.json").read_text())

    # The one documented line: timm's VisionTransformer, strict.
    timm_vit = VisionTransformer(**meta["timm_kwargs"]).eval()
    timm_vit.load_state_dict(weights, strict=True)
    ours = load_encoder(str(run / "checkpoints" / step_tag(PROOF_STEPS)))  # consolidated from the DeepSpeed files
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.forward_features(images), ours(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(timm_vit(images), ours(images)[:, 0], atol=1e-5, rtol=0)  # pooled = cls token
    assert all(v.dtype == torch.float32 for v in weights.values())

    # The same bytes as the export train.py wrote at the end of the run.
    at_end = load_file(str(run / "encoder.safetensors"))
    assert weights.keys() == at_end.keys() and all(torch.equal(weights[k], at_end[k]) for k in weights)


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the first test to ask pays for the digits run (400 steps)
def test_export_of_one_checkpoint_tag_in_process(tmp_path_factory, tmp_path):
    run = digits_run(tmp_path_factory)
    path = export_checkpoint(str(run / "checkpoints" / step_tag(PROOF_STEPS)), str(tmp_path))
    assert path == str(tmp_path / "encoder.safetensors")
    assert json.loads((tmp_path / "encoder.json").read_text())["timm_kwargs"]["patch_size"] == 8


def test_export_of_a_folder_without_checkpoint_fails_in_one_line(tmp_path, capsys):
    code, err = export_main(capsys, "--encoder", str(tmp_path), "--output_dir", str(tmp_path / "out"))
    assert code == 2
    assert err.strip().splitlines() == [f"error: no DeepSpeed checkpoint at {tmp_path}: pass a run folder "
                                        f"(with checkpoints/latest) or run/checkpoints/<tag>"]


def test_export_help_and_usage_errors_are_one_line(tmp_path, capsys):
    assert export_main(capsys, "--help")[0] == 0
    for args in (["--out", str(tmp_path)], [str(tmp_path), "--output_dir", str(tmp_path)]):  # old spellings
        code, err = export_main(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    (tmp_path / "file").write_text("")
    code, err = export_main(capsys, "--encoder", str(tmp_path), "--output_dir", str(tmp_path / "file"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: --output_dir {tmp_path / 'file'} is a file: pass a folder"]


def test_an_export_carries_timm_pretrained_cfg_and_is_readable_by_everyone(tmp_path):
    # An export made under a private umask (077, common on shared clusters) is still 0644, and timm's
    # own data pipeline, from encoder.json alone, prepares images exactly as our evaluation does.
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from img2vec.checkpoint import export_encoder
    from img2vec.eval.common import eval_transform
    from img2vec.export import complete_export
    from img2vec.vit import VitEncoder

    encoder = VitEncoder(32, 8, 32, 1, 2)
    old = os.umask(0o077)
    try:
        export_encoder({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, encoder.timm_kwargs(),
                       str(tmp_path))
        complete_export(str(tmp_path))
    finally:
        os.umask(old)
    assert {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("encoder.safetensors", "encoder.json")} \
        == {"encoder.safetensors": "0o644", "encoder.json": "0o644"}
    meta = json.loads((tmp_path / "encoder.json").read_text())
    config = resolve_data_config(pretrained_cfg=meta["pretrained_cfg"])
    assert config["input_size"] == [3, 32, 32] and config["crop_pct"] == 0.875  # MAE's and DINO's protocol
    image = Image.fromarray(torch.randint(0, 256, (45, 60, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    torch.testing.assert_close(create_transform(**config)(image), eval_transform(32)(image), atol=1e-6, rtol=0)
    before = (tmp_path / "encoder.json").read_bytes()
    complete_export(str(tmp_path))  # idempotent
    assert (tmp_path / "encoder.json").read_bytes() == before


def test_fixed_tables_in_the_export_are_the_exact_fp32_ones(monkeypatch, tmp_path):
    """Under bf16 a checkpoint holds a bf16 copy of the frozen sin-cos table; the export must carry
    the exact fp32 table instead (frozen parameters win over the checkpoint's copy)."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    import img2vec.checkpoint as checkpoint
    from img2vec.vit import sincos_pos_embed

    exact = sincos_pos_embed(64, 4, cls_token=True)
    rounded = exact.bfloat16().float()
    assert not torch.equal(exact, rounded)  # the case exists: bf16 changes the table
    trained = torch.randn(3, 3)
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda path, trust: None)
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda folder, tag: {"encoder.pos_embed": rounded, "encoder.w": trained})
    state = checkpoint.load_fp32_state_dict(str(tmp_path / "step_000001"), {"encoder.pos_embed": exact})
    assert torch.equal(state["encoder.pos_embed"], exact) and torch.equal(state["encoder.w"], trained)
