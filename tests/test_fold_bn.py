"""Folding the frozen teacher's batch norms into its convolutions (img2vec/fold_bn.py)."""
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from img2vec.config import load_config
from img2vec.fold_bn import conv_bn_pairs, fold_batch_norms
from img2vec.runtime import build_teacher
from img2vec.teacher import Teacher


def _astronaut(size: int) -> torch.Tensor:
    """(1, 3, size, size) ImageNet-normalized crop of scikit-image's astronaut photograph."""
    import skimage.data

    rgb = skimage.data.astronaut()[:size, 100:100 + size].astype(np.float32) / 255.0  # (S, S, 3)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def _randomize_batch_norms(model: nn.Module) -> int:
    """Running stats and affine parameters away from their init (1, 0), as trained weights are."""
    g = torch.Generator().manual_seed(0)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
            n += 1
    return n


def test_folded_resnet_equals_its_batch_norms_on_a_real_image():
    teacher = Teacher("resnet18", 2, "random", 8, 128, fold_bn=False)
    bns = _randomize_batch_norms(teacher.backbone)
    assert bns == 10  # stem 1 + layer1 2x2 + layer2 2x2 + its downsample 1
    folded, n = fold_batch_norms(teacher.backbone)
    assert n == bns and folded is not teacher.backbone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.backbone.modules()) == bns  # original kept
    image = _astronaut(128)
    with torch.no_grad():
        want, got = teacher.backbone(image)[0], folded(image)[0]  # (1, 128, 16, 16)
    assert want.abs().max() > 0.1  # a real feature map, not zeros after the ReLUs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_pairs_are_what_the_forward_does():
    teacher = Teacher("resnet18", 1, "random", 4, 64, fold_bn=False)
    pairs = conv_bn_pairs(teacher.backbone, torch.randn(1, 3, 64, 64))
    assert pairs == [("conv1", "bn1")] + [(f"layer1.{b}.conv{i}", f"layer1.{b}.bn{i}") for b in (0, 1) for i in (1, 2)]


class _ConvUsedTwice(nn.Module):
    """bn(conv(x)) + conv(x): folding bn into conv would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_whose_output_is_used_elsewhere_keeps_its_batch_norm(caplog):
    model = _ConvUsedTwice().eval()
    _randomize_batch_norms(model)
    with caplog.at_level(logging.WARNING, logger="img2vec.teacher"):
        same, n = fold_batch_norms(model)
    assert same is model and n == 0 and isinstance(model.bn, nn.BatchNorm2d)
    assert "changed the teacher's output" in caplog.text and "they run as they are" in caplog.text


def test_training_mode_meta_and_models_without_batch_norms_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batch_norms(model) == (model, 0)  # training mode: the batch norm uses batch statistics
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert fold_batch_norms(meta) == (meta, 0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fold_batch_norms(plain) == (plain, 0)


@pytest.mark.parametrize("fold", [True, False])
def test_the_config_switch_picks_folded_or_batch_norms(fold):
    cfg = load_config(None, ["--teacher", "resnet18", "--teacher_stage", "1", "--teacher_weights", "random",
                             "--teacher_fold_bn", str(fold).lower()])
    teacher = build_teacher(cfg)
    assert teacher.folded_bn == (5 if fold else 0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == (not fold)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_folded_teacher_on_cuda_matches_within_bf16():
    """As train.py runs it: channels_last, bf16 autocast; the folded weights round differently."""
    plain = Teacher("resnet18", 2, "random", 8, 128, fold_bn=False)
    _randomize_batch_norms(plain.backbone)
    folded = Teacher("resnet18", 2, "random", 8, 128, fold_bn=False)
    folded.backbone, n = fold_batch_norms(plain.backbone)
    assert n == 10
    image = _astronaut(128).cuda()
    want, got = plain.cuda()(image), folded.cuda()(image)  # (1, 256, 128) each
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2


def test_weights_from_a_file_are_loaded_then_folded(tmp_path):
    from safetensors.torch import save_file

    from img2vec.teacher import load_teacher_weights

    source = Teacher("resnet18", 2, "random", 8, 128, seed=7, fold_bn=False)
    _randomize_batch_norms(source.backbone)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    folded = Teacher("resnet18", 2, str(path), 8, 128)
    assert folded.folded_bn == 10
    image = _astronaut(128)
    want = source(image)  # (1, 256, 128)
    torch.testing.assert_close(folded(image), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with pytest.raises(ValueError, match="folded into its convolutions: give the weights when building it"):
        load_teacher_weights(folded, str(path))
