"""Teacher: CNN stages and ViT blocks on the student grid, frozen state, seeded init,
checkpoint layouts (bitwise-equal outputs), errors. Small timm models (test_resnet, test_vit)."""
import argparse
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from img2vec import teacher as teacher_module
from img2vec.teacher import (CheckpointLayoutError, TeacherWeightsError, load_teacher_weights, resolve_teacher_stage,
                             validate_teacher_stage)


def Teacher(*args, **kwargs):  # noqa: N802
    """Stages, layouts and loading are checked on timm's own structure, batch norms unfolded:
    bitwise comparisons with a directly loaded timm model need it. Folding: tests/test_fold_bn.py."""
    return teacher_module.Teacher(*args, fold_bn=False, **kwargs)

P = 16  # student patch size
CNN, VIT = ("test_resnet", 3), ("test_vit", 2)  # stride 16 both; C = 192, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: OpenMP start-up costs more than it saves (a busy CI box makes it far worse)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cnn3():
    return Teacher(*CNN, "random", patch_size=P, image_size=64)


def backbone_module(teacher):
    """The timm module whose state dict a checkpoint fills (a ViT's getter wraps it as .model)."""
    return getattr(teacher.backbone, "model", teacher.backbone)


def direct_load(teacher, sd):
    """Reference loading, not through load_teacher_weights: copy the used tensors by name."""
    m = backbone_module(teacher)
    m.load_state_dict({k: sd[k] for k in m.state_dict()}, strict=True)
    return teacher


def test_shape_dtype_frozen_eval(cnn3):
    assert (cnn3.channels, cnn3.stride, cnn3.num_patches) == (192, 16, 16)
    cnn3.train()
    assert not any(m.training for m in cnn3.modules())  # BN keeps running stats
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = cnn3(x)
    assert out.shape == (2, 16, 192) and out.dtype == torch.float32
    assert not out.requires_grad and out.transpose(1, 2).is_contiguous()  # a view of the (B, C, h, w) map
    assert not any(p.requires_grad for p in cnn3.parameters())


def teachers_own_normalization(x, teacher):
    """ImageNet-normalized images -> normalized with the teacher's timm pretrained_cfg mean/std."""
    from dataloading.datasets import IMAGENET_MEAN, IMAGENET_STD

    def col(v):
        return torch.tensor(v).view(1, 3, 1, 1)

    cfg = teacher.backbone.pretrained_cfg
    raw = x * col(IMAGENET_STD) + col(IMAGENET_MEAN)  # back to [0, 1] pixels
    return (raw - col(cfg["mean"])) / col(cfg["std"])


def test_teacher_gets_its_own_input_normalization():
    """A teacher trained with other mean/std (timm's test models, CLIP, BEiT: 0.5/0.5 and others)
    sees its own normalization; an ImageNet-normalized teacher sees the images untouched."""
    odd = Teacher("test_resnet", 3, "random", P, image_size=64)
    assert odd.backbone.pretrained_cfg["mean"] != (0.485, 0.456, 0.406) and odd.renormalize
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(odd(x), odd.backbone(teachers_own_normalization(x, odd))[0].flatten(2).transpose(1, 2))
    imagenet = Teacher("resnet18", 3, "random", P, image_size=64)
    assert not imagenet.renormalize
    torch.testing.assert_close(imagenet(x), imagenet.backbone(x)[0].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("stage,size,how", [
    (3, 64, "none"),         # stride 16 == p: 4x4 map is the grid
    (2, 64, "pool"),         # stride 8: 8x8 -> 4x4
    (4, 64, "interp"),       # stride 32: 2x2 -> 4x4
    (3, 72, "pool"),         # 72 px: map 5x5 (ceil), grid 72 // 16 = 4
    (4, 96, "interp"),       # map 3x3 -> grid 6x6, odd scale
])
def test_patch_grid_resampling(stage, size, how, cnn3):
    t = cnn3 if stage == 3 else Teacher("test_resnet", stage, "random", P, image_size=size)
    x = torch.randn(2, 3, size, size)
    fmap = t.backbone(teachers_own_normalization(x, t))[0]  # (B, C, h, w), raw stage output
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


@pytest.mark.parametrize("name,stage", [("test_vit", 2), ("vit_small_patch14_reg4_dinov2", 0)])
def test_vit_patch_tokens_of_block_k(name, stage):
    """Block k's output, prefix (cls + register) tokens dropped, row-major on the grid."""
    t = Teacher(name, stage, "random", P, image_size=64)
    m = t.backbone.model
    assert len(m.blocks) == stage + 1  # later blocks not built
    x = torch.randn(2, 3, 64, 64)
    s = m.patch_embed.patch_size[0]
    with torch.no_grad():  # patch 14: the ViT sees the top-left 56 x 56 px
        h = m.patch_embed(teachers_own_normalization(x, t)[..., :64 // s * s, :64 // s * s])  # (B, h, w, C)
        h = m.norm_pre(m.patch_drop(m._pos_embed(h)))  # (B, prefix + hw, C)
        for blk in m.blocks:
            h = blk(h)
    tokens = h[:, m.num_prefix_tokens:]  # (B, hw, C)
    g = 64 // s
    assert g == 64 // P  # patch 14 or 16 at 64 px: a 4x4 token grid, as the student's
    fmap = tokens.transpose(1, 2).reshape(2, -1, g, g)  # (B, C, g, g)
    torch.testing.assert_close(t(x), fmap.flatten(2).transpose(1, 2))
    assert t.info.kind == "vit" and t.info.module == f"blocks.{stage}"


@pytest.mark.parametrize("patch", [16, 14])
@pytest.mark.parametrize("name,stage", [CNN, VIT, ("vit_small_patch14_reg4_dinov2", 0)])
def test_student_grid_at_224(name, stage, patch):
    t = Teacher(name, stage, "random", patch, image_size=224)
    out = t(torch.randn(2, 3, 224, 224))
    g = 224 // patch  # 14 or 16
    assert out.shape == (2, g * g, t.channels) and out.isfinite().all()


def test_stage_by_name():
    assert resolve_teacher_stage("resnet50", "layer3").index == 3
    assert resolve_teacher_stage("resnet50", "3").module == "layer3"
    info = resolve_teacher_stage("vit_tiny_patch16_224", "blocks.6")
    assert (info.kind, info.index, info.stride, info.channels) == ("vit", 6, 16, 192)
    a, b = Teacher("test_resnet", "layer2", "random", P, 64), Teacher("test_resnet", 2, "random", P, 64)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a(x), b(x))


def test_random_weights_seeded_and_global_rng_untouched(caplog):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="img2vec.teacher"):
        a = Teacher("test_resnet", 1, "random", P, 64, seed=3)
    assert "teacher weights are random" in caplog.text
    b = Teacher("test_resnet", 1, "random", P, 64, seed=3)
    c = Teacher("test_resnet", 1, "random", P, 64, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    w = lambda t: t.backbone.conv1[0].weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


# --- checkpoint layouts: each written from a small random timm model ------------------

def _dino(sd, other, kind):
    # DINO main_dino.py: the student is DDP-wrapped; the teacher only for BN models (ResNet)
    tprefix = "module.backbone." if kind == "cnn" else "backbone."
    head = {"head.mlp.0.weight": torch.randn(8, 4), "head.last_layer.weight_g": torch.randn(8, 1)}
    return {"student": {**{"module.backbone." + k: v for k, v in other.items()},
                        **{"module." + k: v for k, v in head.items()}},
            "teacher": {**{tprefix + k: v for k, v in sd.items()},
                        **{("module." if kind == "cnn" else "") + k: v for k, v in head.items()}},
            "epoch": 100, "args": argparse.Namespace(arch="vit_small", out_dim=65536)}


def _mocov3(sd, other, kind):
    # MoCo v3 main_moco.py: base and momentum encoders (projector head) + predictor, under DDP
    proj = "fc.0.weight" if kind == "cnn" else "head.0.weight"
    return {"epoch": 300, "arch": "vit_small",
            "state_dict": {**{"module.base_encoder." + k: v for k, v in sd.items()},
                           f"module.base_encoder.{proj}": torch.randn(8, 4),
                           **{"module.momentum_encoder." + k: v for k, v in other.items()},
                           "module.predictor.0.weight": torch.randn(8, 4)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


LAYOUTS = {
    "plain": lambda sd, other, kind: sd,
    "state_dict": lambda sd, other, kind: {"state_dict": sd},
    "model": lambda sd, other, kind: {"model": sd, "epoch": 3},
    "ddp": lambda sd, other, kind: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    "dino": _dino,
    "mocov3": _mocov3,
    "safetensors": lambda sd, other, kind: {"module." + k: v.contiguous() for k, v in sd.items()},
}


@pytest.fixture(scope="module")
def sources():
    """{kind: (name, stage, state dict, a different state dict)}, at image size 64."""
    out = {}
    for kind, (name, stage) in {"cnn": CNN, "vit": VIT}.items():
        extra = {"img_size": 64} if kind == "vit" else {}
        torch.manual_seed(123)
        sd = timm.create_model(name, **extra).state_dict()
        other = timm.create_model(name, **extra).state_dict()
        out[kind] = (name, stage, sd, other)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_checkpoint_layout_bitwise(layout, kind, sources, tmp_path):
    name, stage, sd, other = sources[kind]
    obj = LAYOUTS[layout](sd, other, kind)
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    x = torch.randn(2, 3, 64, 64)
    loaded = Teacher(name, stage, str(path), P, 64)
    reference = direct_load(Teacher(name, stage, "random", P, 64, seed=5), sd)
    assert torch.equal(loaded(x), reference(x))
    assert not torch.equal(loaded(x), Teacher(name, stage, "random", P, 64)(x))  # not the init


def test_load_torchvision_resnet(tmp_path):
    """torchvision's ResNet names are timm's: its state dict loads as is."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    x = torch.randn(2, 3, 64, 64)
    t = Teacher("resnet18", 3, str(path), P, 64)
    assert torch.equal(t(x), direct_load(Teacher("resnet18", 3, "random", P, 64, seed=5), sd)(x))


def test_load_into_existing_teacher_and_vit_pos_embed_resampled(tmp_path, cnn3, sources):
    name, stage, sd, _ = sources["cnn"]
    path = tmp_path / "w.safetensors"
    save_file({"encoder." + k: v.contiguous() for k, v in sd.items()}, str(path))
    load_teacher_weights(cnn3, str(path))  # drops layer4.* and fc.*
    own = cnn3.backbone.state_dict()
    assert own and all(torch.equal(v, sd[k]) for k, v in own.items())

    torch.manual_seed(1)
    vit = timm.create_model("test_vit")  # built at 160 px: pos_embed (1, 1 + 10 * 10, 64)
    torch.save(vit.state_dict(), tmp_path / "vit160.pth")
    t = Teacher("test_vit", 1, str(tmp_path / "vit160.pth"), P, 64)  # 4x4 grid
    expect = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(t.backbone.model.pos_embed, expect)
    assert torch.equal(t.backbone.model.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)


def test_unknown_layout_lists_top_level_keys(tmp_path, cnn3, sources):
    sd = sources["cnn"][2]
    cases = {
        "net.pth": ({"net": sd, "epoch": 1},
                    r"top-level keys found: net \(dict, \d+ entries\), epoch \(int\)"),
        "prefixed.pth": ({"net." + k: v for k, v in sd.items()},
                         r"top-level keys found: net\.\* \(\d+ tensors\)"),
        "list.pth": ([sd["fc.weight"]], r"top-level keys found: none \(the file holds a list"),
    }
    for file, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / file)
        with pytest.raises(CheckpointLayoutError, match=rf"unknown checkpoint layout in .*{file}: {msg}.*"
                                                        r"expected the teacher's tensors \(e\.g\. 'conv1"):
            load_teacher_weights(cnn3, str(tmp_path / file))


def test_load_errors(tmp_path, cnn3, sources):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="teacher weights file not found: .*nope.pth"):
        load_teacher_weights(cnn3, str(missing))

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    msg = "could not read teacher weights .*notes.pth: .*torch.save"
    with pytest.raises(TeacherWeightsError, match=msg):  # the user's file: one line, exit 2 at the entry points
        load_teacher_weights(cnn3, str(text))

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_text("nope")
    with pytest.raises(TeacherWeightsError, match="could not read teacher weights"):
        load_teacher_weights(cnn3, str(bad_st))

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sources["cnn"][2].items() if not k.startswith("layer3.")}, partial)
    with pytest.raises(TeacherWeightsError, match=r"\d+ missing keys, e\.g\. layer3\.0\."):
        load_teacher_weights(cnn3, str(partial))


def test_load_shape_mismatch_message(tmp_path):
    """resnet50 and resnet18 share key names up to layer1 (bottleneck vs basic): shapes differ."""
    r50 = tmp_path / "r50.pth"
    with torch.device("meta"):
        sd = timm.create_model("resnet50").state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in sd.items() if not k.startswith(("layer3", "layer4"))}, r50)
    msg = (r"\d+ shape mismatches \(file vs model\), e\.g\. layer1\.0\.conv1\.weight "
           r"\(64, 64, 1, 1\) vs \(64, 64, 3, 3\)")
    with pytest.raises(TeacherWeightsError, match=msg):
        Teacher("resnet18", 1, str(r50), P, 64)


def test_validate_teacher_stage():
    validate_teacher_stage("resnet50", 0)
    validate_teacher_stage("resnet50", 4)
    validate_teacher_stage("vit_tiny_patch16_224", 11)
    with pytest.raises(ValueError, match="unknown teacher 'resnet5000': pass a timm model name"):
        validate_teacher_stage("resnet5000", 3)
    with pytest.raises(ValueError, match=r"unknown teacher 'vit_tiny'.*did you mean vit_tiny_patch16_224"):
        validate_teacher_stage("vit_tiny", 6)
    msg = r"teacher resnet50 has stages 0\.\.4 \(strides 2,4,8,16,32; modules act1,layer1,.*; got stage 7"
    with pytest.raises(ValueError, match=msg):
        validate_teacher_stage("resnet50", 7)
    with pytest.raises(ValueError, match="got stage -1"):
        validate_teacher_stage("resnet50", -1)
    with pytest.raises(ValueError, match=r"has blocks 0\.\.11 \(blocks\.0\.\.blocks\.11, stride 16\); got block 12"):
        validate_teacher_stage("vit_tiny_patch16_224", 12)
    with pytest.raises(ValueError, match="has no stage 'layer9'; its stages are 0=act1, 1=layer1"):
        validate_teacher_stage("resnet50", "layer9")
    with pytest.raises(ValueError, match="has stages"):
        Teacher("test_resnet", 5, "random", P, 64)
