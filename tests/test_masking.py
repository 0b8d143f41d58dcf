"""MAE random masking: sizes, disjointness, inverse permutation, reproducibility."""
import torch

from img2vec.masking import mask_noise, num_visible, random_masking


def test_fraction_and_disjoint_cover():
    B, N, ratio = 5, 196, 0.75
    mask = random_masking(B, N, ratio, generator=torch.Generator().manual_seed(0))
    V = num_visible(N, ratio)
    assert V == 49 and mask.ids_keep.shape == (B, V) and mask.ids_masked.shape == (B, N - V)
    for b in range(B):
        keep, masked = set(mask.ids_keep[b].tolist()), set(mask.ids_masked[b].tolist())
        assert not keep & masked and keep | masked == set(range(N))


def test_ids_restore_inverts_the_shuffle():
    B, N = 3, 37
    mask = random_masking(B, N, 0.6, generator=torch.Generator().manual_seed(1))
    shuffled = torch.cat([mask.ids_keep, mask.ids_masked], dim=1)  # (B, N)
    assert torch.equal(torch.gather(shuffled, 1, mask.ids_restore), torch.arange(N).expand(B, N))


def test_reproducible_with_a_seed_and_different_across_seeds():
    a = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(7))
    b = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(7))
    c = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.ids_masked, c.ids_masked)


def test_masks_are_independent_of_world_size():
    # Two ranks slicing the global noise see exactly the masks one rank sees for the whole batch.
    noise = mask_noise(8, 49, seed=3, step=11)
    whole = random_masking(8, 49, 0.75, noise=noise)
    halves = [random_masking(4, 49, 0.75, noise=noise[r * 4:(r + 1) * 4]) for r in range(2)]
    assert torch.equal(whole.ids_masked, torch.cat([h.ids_masked for h in halves]))
    assert torch.equal(mask_noise(8, 49, 3, 11), noise) and not torch.equal(mask_noise(8, 49, 3, 12), noise)


def test_extreme_ratios_keep_one_visible_and_one_masked():
    assert num_visible(16, 0.999) == 1 and num_visible(16, 0.001) == 15
