"""masked_feature_loss_ref against an independent by-hand computation, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from kernels.reference import masked_feature_loss_ref


def by_hand(pred, target, ids_masked, beta, eps, kind="smooth_l1"):
    """Row by row: pick the masked rows, F.layer_norm the target, F.smooth_l1_loss (or the
    squared error), average."""
    B, M = ids_masked.shape
    total, count = 0.0, 0
    for b in range(B):
        for m in range(M):
            n = ids_masked[b, m]
            row = pred[b, n] if pred.shape[1] == target.shape[1] else pred[b, m]
            t = F.layer_norm(target[b, n].double(), (target.shape[-1],), eps=eps)
            if kind == "mse":
                total = total + ((row.double() - t) ** 2).sum()
            else:
                total = total + F.smooth_l1_loss(row.double(), t, reduction="sum", beta=beta)
            count += row.numel()
    return total / count


@pytest.mark.parametrize("B, N, M, C, beta", [(1, 4, 1, 1, 2.0), (3, 16, 12, 7, 2.0), (2, 49, 36, 64, 0.5),
                                              (2, 10, 7, 100, 1.0)])
@pytest.mark.parametrize("layout", ["all_patches", "masked_only"])
@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
def test_matches_by_hand_values_and_grads(B, N, M, C, beta, layout, kind):
    g = torch.Generator().manual_seed(B * 1000 + C)
    target = torch.randn(B, N, C, generator=g) * 3 + 1
    ids_masked = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)])
    rows = N if layout == "all_patches" else M
    pred = (torch.randn(B, rows, C, generator=g) * 2).requires_grad_()
    pred64 = pred.detach().double().requires_grad_()

    loss = masked_feature_loss_ref(pred, target, ids_masked, beta=beta, eps=1e-6, kind=kind)
    expected = by_hand(pred64, target, ids_masked, beta, 1e-6, kind)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(pred.grad.double(), pred64.grad, atol=1e-7, rtol=1e-5)
    if layout == "all_patches":  # unmasked rows get exactly zero gradient
        unmasked = torch.ones(B, N, dtype=torch.bool)
        unmasked[torch.arange(B)[:, None], ids_masked] = False
        assert pred.grad[unmasked].abs().max() == 0


def test_fp32_result_and_grad_dtype_for_bf16_pred():
    pred = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = masked_feature_loss_ref(pred, torch.randn(2, 8, 16), torch.tensor([[0, 3], [5, 7]]))
    loss.backward()
    assert loss.dtype == torch.float32 and pred.grad.dtype == torch.bfloat16


def test_constant_target_row_stays_finite():
    target = torch.full((1, 4, 8), 5.0)
    pred = torch.randn(1, 4, 8, requires_grad=True)
    loss = masked_feature_loss_ref(pred, target, torch.tensor([[1, 2]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_target_gets_no_gradient_and_bad_shapes_fail():
    target = torch.randn(1, 4, 8, requires_grad=True)
    masked_feature_loss_ref(torch.randn(1, 4, 8, requires_grad=True), target, torch.tensor([[1]])).backward()
    assert target.grad is None
    with pytest.raises(ValueError, match="pred has 3 tokens"):
        masked_feature_loss_ref(torch.randn(1, 3, 8), target, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="beta must be > 0"):
        masked_feature_loss_ref(torch.randn(1, 4, 8), target, torch.tensor([[1]]), beta=0.0)


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
def test_strided_bf16_target_and_float64_math(kind):
    """A channels_last bf16 (B, C, h, w) map viewed as (B, N, C) is read as it is, and
    math_dtype=float64 is the fp32 contract to fp32 rounding."""
    g = torch.Generator().manual_seed(7)
    fmap = (torch.randn(2, 24, 4, 5, generator=g) * 3 + 1).to(torch.bfloat16)
    fmap = fmap.contiguous(memory_format=torch.channels_last)  # (B, C, h, w), (B, h, w, C) in memory
    target = fmap.flatten(2).transpose(1, 2)  # (B, N, C) view, N = 20
    assert target.data_ptr() == fmap.data_ptr()
    ids = torch.stack([torch.randperm(20, generator=g)[:15] for _ in range(2)])
    pred = torch.randn(2, 15, 24, generator=g)
    loss = masked_feature_loss_ref(pred, target, ids, beta=1.0, kind=kind)
    loss64 = masked_feature_loss_ref(pred, target, ids, beta=1.0, kind=kind, math_dtype=torch.float64)
    expected = by_hand(pred.double(), target.float(), ids, 1.0, 1e-6, kind)
    assert loss.dtype == torch.float32 and loss64.dtype == torch.float64
    torch.testing.assert_close(loss64, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)


def test_bad_kind_fails():
    with pytest.raises(ValueError, match="kind must be one of"):
        masked_feature_loss_ref(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.tensor([[1]]), kind="l1")
