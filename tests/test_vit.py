"""Student ViT: timm-compatible encoder, MAE masking path, decoder output, size factories."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from img2vec.masking import random_masking
from img2vec.vit import VIT_SIZES, VitEncoder, build_student, count_params, sincos_pos_embed


def test_encoder_loads_into_timm_strict_and_features_match():
    torch.manual_seed(0)
    student = build_student("vit_tiny", 64, 16, 256, 1, 64, 2).eval()
    timm_vit = VisionTransformer(**student.encoder.timm_kwargs()).eval()
    timm_vit.load_state_dict(student.encoder.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = student.encoder(images)  # (B, 1 + N, D)
        theirs = timm_vit.forward_features(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_visible_only_encoder_equals_gathering_from_the_full_sequence_when_depth_is_zero():
    enc = VitEncoder(32, 8, 64, depth=0, heads=2).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    full = enc(images)[:, 1:]  # (B, N, D) after the final norm, which is per token
    vis = enc(images, mask.ids_keep)[:, 1:]  # (B, V, D)
    torch.testing.assert_close(vis, torch.gather(full, 1, mask.ids_keep[..., None].expand(-1, -1, 64)))


def test_student_predicts_every_patch_and_masked_patches_get_gradient():
    student = build_student("vit_tiny", 32, 8, 24, 1, 32, 2)
    mask = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    images = torch.randn(3, 3, 32, 32)
    pred = student(images, mask.ids_keep, mask.ids_restore)
    assert pred.shape == (3, 16, 24)
    pred_masked = student(images, mask.ids_keep, mask.ids_restore, mask.ids_masked)  # (B, M, C)
    torch.testing.assert_close(pred_masked, torch.gather(pred, 1, mask.ids_masked[..., None].expand(-1, -1, 24)))
    pred.pow(2).mean().backward()
    assert student.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert student.decoder.mask_token.grad.abs().sum() > 0
    assert not student.encoder.pos_embed.requires_grad  # fixed sin-cos


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_attention_impls_agree(impl):
    torch.manual_seed(0)
    ref = build_student("vit_tiny", 32, 8, 24, 1, 32, 2, attn_impl="math")
    other = build_student("vit_tiny", 32, 8, 24, 1, 32, 2, attn_impl=impl)
    other.load_state_dict(ref.state_dict())
    mask = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other(x, mask.ids_keep, mask.ids_restore), ref(x, mask.ids_keep, mask.ids_restore),
                               atol=1e-5, rtol=1e-5)


def test_sincos_is_mae_layout():
    emb = sincos_pos_embed(8, 2, cls_token=True)  # (1, 1 + 4, 8)
    assert emb.shape == (1, 5, 8) and emb[0, 0].abs().sum() == 0
    # patch 1 is (row 0, col 1): its first half encodes x = 1, the second half y = 0.
    assert torch.allclose(emb[0, 2, :2], torch.sin(torch.tensor([1.0, 0.01])))
    assert torch.allclose(emb[0, 2, 4:6], torch.zeros(2))


@pytest.mark.parametrize("name, millions", [("vit_tiny", 5.5), ("vit_base", 85.8), ("vit_huge", 630.8)])
def test_size_factories_match_published_parameter_counts(name, millions):
    size = VIT_SIZES[name]
    with torch.device("meta"):
        enc = VitEncoder(224, size.patch_size, size.width, size.depth, size.heads)
    assert abs(count_params(enc) / 1e6 - millions) < 0.1


def test_student_drop_path_matches_timm_stochastic_depth_and_keeps_timm_names():
    """drop_path rates rise linearly to the setting at the last block, as in timm's VisionTransformer;
    in eval mode and at rate 0 the encoder is unchanged; in training mode a dropped branch is
    the identity per sample, and the same seed drops the same samples in timm's model."""
    torch.manual_seed(0)
    ours = VitEncoder(32, 8, 32, depth=3, heads=2, drop_path=0.3)
    theirs = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                               global_pool="token", drop_path_rate=0.3)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # DropPath adds no parameters
    assert [b.drop_path.drop_prob if i else 0.0 for i, b in enumerate(ours.blocks)] == pytest.approx(
        [b.drop_path1.drop_prob if i else 0.0 for i, b in enumerate(theirs.blocks)])
    assert [float(getattr(b.drop_path, "drop_prob", 0.0)) for b in ours.blocks] == pytest.approx([0.0, 0.15, 0.3])
    images = torch.randn(16, 3, 32, 32)
    plain = VitEncoder(32, 8, 32, depth=3, heads=2)
    plain.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), plain.eval()(images))
        ours.train(), theirs.train()
        torch.manual_seed(1)
        dropped = ours(images)
        torch.manual_seed(1)
        torch.testing.assert_close(dropped, theirs.forward_features(images), atol=1e-5, rtol=0)
        assert not torch.allclose(dropped, plain(images), atol=1e-3)  # something was dropped
    student = build_student("vit_tiny", 32, 8, 24, 1, 32, 2, drop_path=0.2)
    assert student.encoder.blocks[-1].drop_path.drop_prob == 0.2
    plain_student = build_student("vit_tiny", 32, 8, 24, 1, 32, 2)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in plain_student.encoder.blocks)
