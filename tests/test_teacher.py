"""Teacher: shapes, patch-grid resampling, frozen state, seeded init, weight loading, errors."""
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from img2vec.teacher import Teacher, load_teacher_weights, validate_teacher_stage

P = 16  # student patch size


@pytest.fixture(scope="module")
def teacher3():
    return Teacher("resnet50", 3, "random", patch_size=P, image_size=64)


@pytest.fixture(scope="module")
def classifier_sd():
    """A full timm resnet50 classifier state dict (head and layer4 included), non-default init."""
    torch.manual_seed(123)
    return timm.create_model("resnet50", pretrained=False).state_dict()


def assert_loaded(teacher, sd):
    own = teacher.backbone.state_dict()
    assert own and all(torch.equal(v, sd[k]) for k, v in own.items())


def test_shape_dtype_frozen_eval(teacher3):
    assert (teacher3.channels, teacher3.stride, teacher3.num_patches) == (1024, 16, 16)
    teacher3.train()
    assert not any(m.training for m in teacher3.modules())  # BN keeps running stats
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = teacher3(x)
    assert out.shape == (2, 16, 1024) and out.dtype == torch.float32
    assert not out.requires_grad and out.is_contiguous()
    assert not any(p.requires_grad for p in teacher3.parameters())


@pytest.mark.parametrize("stage,size,how", [
    (3, 64, "none"),         # stride 16 == p: 4x4 map is the grid
    (2, 64, "pool"),         # stride 8: 8x8 -> 4x4
    (4, 64, "interp"),       # stride 32: 2x2 -> 4x4
    (3, 72, "pool"),         # 72 px: map 5x5 (ceil), grid 72 // 16 = 4
    (4, 96, "interp"),       # map 3x3 -> grid 6x6, odd scale
])
def test_patch_grid_resampling(stage, size, how, teacher3):
    t = teacher3 if stage == 3 else Teacher("resnet50", stage, "random", P, image_size=size)
    x = torch.randn(2, 3, size, size)
    fmap = t.backbone(x)[0]  # (B, C, h, w), raw stage output
    g = size // P
    if how == "pool":
        ref = F.adaptive_avg_pool2d(fmap, (g, g))
    elif how == "interp":
        ref = F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False)
    else:
        ref = fmap
    assert ref.shape[-2:] == (g, g)
    out = t(x)  # (B, N, C)
    assert out.shape == (2, g * g, t.channels)
    # row-major patch order: patch r * g + c is map cell (r, c)
    for r, c in [(0, 0), (0, g - 1), (g - 1, 0), (g // 2, g - 1)]:
        torch.testing.assert_close(out[:, r * g + c], ref[:, :, r, c])
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2))


def test_random_weights_seeded_and_global_rng_untouched(caplog):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="img2vec.teacher"):
        a = Teacher("resnet50", 1, "random", P, 64, seed=3)
    assert "teacher weights are random" in caplog.text
    b = Teacher("resnet50", 1, "random", P, 64, seed=3)
    c = Teacher("resnet50", 1, "random", P, 64, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    w = lambda t: t.backbone.conv1.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_load_prefixed_and_wrapped(tmp_path, classifier_sd):
    for i, wrap in enumerate([
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": {"module.backbone." + k: v for k, v in sd.items()}},
        lambda sd: {"model": sd, "epoch": 3},
    ]):
        path = tmp_path / f"w{i}.pth"
        torch.save(wrap(classifier_sd), path)
        assert_loaded(Teacher("resnet50", 1, str(path), P, 64), classifier_sd)


def test_load_safetensors_into_existing_teacher(tmp_path, classifier_sd, teacher3):
    path = tmp_path / "w.safetensors"
    save_file({"encoder." + k: v.contiguous() for k, v in classifier_sd.items()}, str(path))
    load_teacher_weights(teacher3, str(path))  # drops layer4.* and fc.*
    assert_loaded(teacher3, classifier_sd)


def test_load_torchvision_resnet50(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    t = Teacher("resnet50", 3, str(path), P, 64)
    assert_loaded(t, sd)


def test_load_errors(tmp_path, teacher3, classifier_sd):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="teacher weights file not found: .*nope.pth"):
        load_teacher_weights(teacher3, str(missing))

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    msg = "could not read teacher weights .*notes.pth: .*torch.save"
    with pytest.raises(ValueError, match=msg):
        load_teacher_weights(teacher3, str(text))

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_text("nope")
    with pytest.raises(ValueError, match="could not read teacher weights"):
        load_teacher_weights(teacher3, str(bad_st))

    r18 = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), r18)
    msg = (r"\d+ shape mismatches \(file vs model\), e\.g\. layer1\.0\.conv1\.weight "
           r"\(64, 64, 3, 3\) vs \(64, 64, 1, 1\).*; \d+ missing keys, e\.g\. layer1\.0\.conv3")
    with pytest.raises(ValueError, match=msg):
        load_teacher_weights(teacher3, str(r18))

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in classifier_sd.items() if not k.startswith("layer3.")}, partial)
    with pytest.raises(ValueError, match=r"\d+ missing keys, e\.g\. layer3\.0\."):
        load_teacher_weights(teacher3, str(partial))


def test_load_resnet18_shape_mismatch_message(tmp_path):
    """Same key names as resnet50 up to layer1 (resnet18 stage 1 is a subset): shapes differ."""
    r50 = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), r50)
    with pytest.raises(ValueError, match=r"shape mismatches \(file vs model\), e\.g\. layer1\.0"):
        Teacher("resnet18", 1, str(r50), P, 64)


def test_validate_teacher_stage():
    validate_teacher_stage("resnet50", 0)
    validate_teacher_stage("resnet50", 4)
    with pytest.raises(ValueError, match="unknown teacher 'resnet5000': pass a timm model name"):
        validate_teacher_stage("resnet5000", 3)
    msg = r"teacher resnet50 has stages 0\.\.4 \(strides 2,4,8,16,32\); got stage 7"
    with pytest.raises(ValueError, match=msg):
        validate_teacher_stage("resnet50", 7)
    with pytest.raises(ValueError, match="got stage -1"):
        validate_teacher_stage("resnet50", -1)
    with pytest.raises(ValueError, match="has stages"):
        Teacher("resnet50", 5, "random", P, 64)
