"""MAE random masking: which patches the encoder sees and which the loss scores."""
from typing import NamedTuple, Optional

import torch


class Mask(NamedTuple):
    ids_keep: torch.Tensor  # (B, V) visible patch indices, ascending noise order
    ids_masked: torch.Tensor  # (B, M) masked patch indices
    ids_restore: torch.Tensor  # (B, N) position of each patch in cat(ids_keep, ids_masked)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """V = int(N * (1 - mask_ratio)), as MAE; at least one visible and one masked patch."""
    return min(max(int(num_patches * (1 - mask_ratio)), 1), num_patches - 1)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    noise: Optional[torch.Tensor] = None,
) -> Mask:
    """Per-sample uniform random masking (MAE): shuffle patches by noise, keep the first V.

    Args:
        noise: optional (B, N) uniform noise; when given, `generator` is unused. The trainer
            draws noise for the whole global batch and slices its rank's rows, so masks do
            not depend on the number of processes.
    Returns:
        Mask with ids_keep (B, V), ids_masked (B, M), ids_restore (B, N); V + M = N.
        ids_restore inverts the shuffle: cat(keep, masked)[ids_restore] is patch order.
    """
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator)  # (B, N), on CPU: reproducible
    noise = noise.to(device)
    V = num_visible(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N), ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    return Mask(ids_shuffle[:, :V], ids_shuffle[:, V:], ids_restore)


def mask_noise(global_batch: int, num_patches: int, seed: int, step: int) -> torch.Tensor:
    """(G, N) uniform noise for one optimizer step, a function of (seed, step) only.

    Resume and world size therefore never change which patches are masked.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(global_batch, num_patches, generator=g)
