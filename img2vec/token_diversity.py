"""Token diversity of teacher features: pick the teacher whose patch tokens differ most.

Img2Vec (Pan et al., 2023) finds that the best MIM teacher is the one of highest *token
diversity*, the dissimilarity among the feature vectors of one image's tokens. The paper's
exact formula is not available; we use, for an image's tokens F (N, C), rows f_i:

    diversity(F) = 1 - mean_{i != j} cos(f_i, f_j)

averaged over images. 0: all tokens point the same way (collapse); 1: mutually orthogonal
tokens (or uncorrelated zero-mean ones). Range [0, 2] as documented; in fact, since
||sum_i u_i||^2 >= 0 for the unit vectors u_i, the mean cosine is >= -1/(N-1) and the
diversity <= 1 + 1/(N-1). A zero token counts as cos 0 with every other token.

Cost: sum_{i != j} cos(f_i, f_j) = ||sum_i u_i||^2 - sum_i ||u_i||^2, so no (N, N) matrix
is formed: O(N C) work, rows taken in chunks (fp64 accumulation), no host sync.

Effective rank (Roy & Vetterli, 2007), a second view: exp of the entropy of the singular
values of F normalized to sum 1; in [1, min(N, C)] (0 for an all-zero F). It equals r for
r equal nonzero singular values. Computed from the fp64 Gram matrix (F F^T if N <= C, else
F^T F), built in chunks: at most O(min(N, C)^2 + N^2) floats per image at once.

The ranking command is `python -m img2vec.diversity`.
"""
import torch


def _as_batch(features: torch.Tensor) -> torch.Tensor:
    """(N, C) or (B, N, C) -> (B, N, C)."""
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C) or (N, C), got shape {tuple(features.shape)}")
    return features


def _rows_per_chunk(N: int, C: int, chunk_size) -> int:
    """Rows of (., C) per chunk: at most N^2 floats (chunk * C <= N^2) unless chunk_size is given."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(N, N * N // max(C, 1)))


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def token_diversity(features: torch.Tensor, reduction: str = "mean", chunk_size=None) -> torch.Tensor:
    """1 - mean over pairs i != j of cos(f_i, f_j), per image, then averaged over images.

    features: (B, N, C) (or (N, C)), any float dtype, any device; N >= 2.
    reduction: "mean" -> fp32 scalar (), "none" -> fp32 (B,).
    chunk_size: tokens per chunk (default: as many as keep a chunk under N^2 floats).
    No host sync: safe to call every step; read it with .item() at log time.
    """
    x = _as_batch(features).detach()
    B, N, C = x.shape
    if N < 2:
        raise ValueError(f"token diversity needs N >= 2 tokens per image, got N={N}")
    s = torch.zeros(B, C, dtype=torch.float64, device=x.device)  # sum_i u_i
    sq = torch.zeros(B, dtype=torch.float64, device=x.device)  # sum_i ||u_i||^2 (1, or 0 for a zero token)
    step = _rows_per_chunk(N, C, chunk_size)
    for n0 in range(0, N, step):
        u = torch.nn.functional.normalize(x[:, n0:n0 + step].double(), dim=-1)  # (B, n, C) unit rows
        s += u.sum(1)
        sq += u.square().sum((1, 2))
    mean_cos = (s.square().sum(-1) - sq) / (N * (N - 1))  # (B,)
    return _reduce((1.0 - mean_cos).float(), reduction)


def effective_rank(features: torch.Tensor, reduction: str = "mean", chunk_size=None) -> torch.Tensor:
    """exp(entropy of singular values / their sum) of each image's F (N, C); fp32 () or (B,).

    Gram matrix in fp64 (F F^T when N <= C, else F^T F), accumulated over chunks of the
    longer side. eigvalsh checks for errors, so on CUDA this one syncs: use it at log time.
    """
    x = _as_batch(features).detach()
    B, N, C = x.shape
    if N <= C:  # G = F F^T (B, N, N), chunks over channels
        G = torch.zeros(B, N, N, dtype=torch.float64, device=x.device)
        step = _rows_per_chunk(N, C, chunk_size) if chunk_size else N
        for c0 in range(0, C, step):
            f = x[:, :, c0:c0 + step].double()  # (B, N, c)
            G += f @ f.transpose(1, 2)
    else:  # G = F^T F (B, C, C), chunks over tokens
        G = torch.zeros(B, C, C, dtype=torch.float64, device=x.device)
        step = _rows_per_chunk(N, C, chunk_size)
        for n0 in range(0, N, step):
            f = x[:, n0:n0 + step].double()  # (B, n, C)
            G += f.transpose(1, 2) @ f
    sigma = torch.linalg.eigvalsh(G).clamp_min(0).sqrt()  # (B, min(N, C)) singular values
    total = sigma.sum(-1, keepdim=True)  # (B, 1)
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # (B,), 0 log 0 = 0
    erank = torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))
    return _reduce(erank.float(), reduction)


# ------------------------------------------------------------------------------------------
# The command: rank teachers / stages on the same images.
# ------------------------------------------------------------------------------------------


def collapse_probe(pred: torch.Tensor, target: torch.Tensor, ids_masked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token diversity of the student's predictions and of what they regress, on the whole
    micro-batch (a few images make a noisy reading: a flat photograph's targets differ far more
    than any prediction of them can).

    pred (B, M, C) for the masked patches, target (B, N, C) raw teacher features, ids_masked
    (B, M). Returns device scalars (no host sync): `div_pred` falling far below `div_target`
    means the student is collapsing to one vector.
    """
    C = target.shape[-1]
    wanted = torch.gather(target, 1, ids_masked[:, :, None].expand(-1, -1, C))  # (B, M, C)
    return {"div_pred": token_diversity(pred.detach().float()),
            "div_target": token_diversity(torch.nn.functional.layer_norm(wanted.float(), (C,)))}
