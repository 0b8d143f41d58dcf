"""masked_feature_loss_ref against an independent by-hand computation, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from kernels.reference import masked_feature_loss_ref


def by_hand(pred, target, ids_masked, beta, eps):
    """Row by row: pick the masked rows, F.layer_norm the target, F.smooth_l1_loss, average."""
    B, M = ids_masked.shape
    total, count = 0.0, 0
    for b in range(B):
        for m in range(M):
            n = ids_masked[b, m]
            row = pred[b, n] if pred.shape[1] == target.shape[1] else pred[b, m]
            t = F.layer_norm(target[b, n].double(), (target.shape[-1],), eps=eps)
            total = total + F.smooth_l1_loss(row.double(), t, reduction="sum", beta=beta)
            count += row.numel()
    return total / count


@pytest.mark.parametrize("B, N, M, C, beta", [(1, 4, 1, 1, 2.0), (3, 16, 12, 7, 2.0), (2, 49, 36, 64, 0.5),
                                              (2, 10, 7, 100, 1.0)])
@pytest.mark.parametrize("layout", ["all_patches", "masked_only"])
def test_matches_by_hand_values_and_grads(B, N, M, C, beta, layout):
    g = torch.Generator().manual_seed(B * 1000 + C)
    target = torch.randn(B, N, C, generator=g) * 3 + 1
    ids_masked = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(B)])
    rows = N if layout == "all_patches" else M
    pred = (torch.randn(B, rows, C, generator=g) * 2).requires_grad_()
    pred64 = pred.detach().double().requires_grad_()

    loss = masked_feature_loss_ref(pred, target, ids_masked, beta=beta, eps=1e-6)
    expected = by_hand(pred64, target, ids_masked, beta, 1e-6)
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
