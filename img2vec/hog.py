"""Weight-free teachers: MAE's pixel target and MaskFeat's HOG target, on the student grid.

Both turn images (B, 3, H, W) into targets (B, N, C), N = (H // p) * (W // p), row-major
patch order like ViT's patch_embed; an image side that is no multiple of p is cropped
(right / bottom), as the student's stride-p patch embedding ignores those pixels. Neither
has weights: they need no download and carry real image structure, where a randomly
initialised CNN's layer-normed features are mostly one constant direction.

pixels (MAE, He et al. 2022, `norm_pix_loss`): a patch's raw values in MAE's patchify
order (p, q, c), C = p * p * 3. The per-patch normalization is not done here: the loss
layer-norms every target row (kernels/reference.py, biased variance, eps 1e-6), which is
MAE's norm_pix target up to its unbiased variance (a factor sqrt(C / (C - 1)), 1.0007 at
C = 768). With an MSE loss it is MAE exactly.

hog (MaskFeat, Wei et al. 2022): histograms of oriented gradients per 8x8-pixel cell,
    gradient    central differences [-1, 0, 1] along rows and columns, per RGB channel,
                reflect padding (so the border row / column has no gradient across it)
    orientation unsigned, atan2(g_row, g_col) in [0, 180) degrees, 9 bins of 20 degrees,
                hard voting of the gradient magnitude (no interpolation between bins)
    cell        mean magnitude per bin over the cell's 8x8 pixels (avg-pool, stride 8)
    norm        per cell and channel, L2 over the 9 bins: h / sqrt(sum h^2 + eps^2), eps 1e-5
    patch       the (p / 8)^2 cells of a patch concatenated: C = (p / 8)^2 * 3 * 9, in the order
                (cell row, cell col, channel, bin); p = 16 gives C = 108
These are `skimage.feature.hog(channel, orientations=9, pixels_per_cell=(8, 8),
cells_per_block=(1, 1), block_norm="L2")` per channel (tests/test_hog.py). MaskFeat differs in
two details kept out on purpose: it uses Sobel kernels (Dalal & Triggs found the plain
[-1, 0, 1] best) and an optional Gaussian weighting of the patch. Everything runs batched on the
images' device as shifted-slice differences, one scatter-add per cell and bin (9 masked
average-pools on CUDA) and a normalization; there is no loop over images.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from img2vec.stage import StageInfo

HOG_BINS = 9
HOG_CELL = 8
HOG_EPS = 1e-5  # skimage's block-normalization epsilon
WEIGHT_FREE_TEACHERS = ("pixels", "hog")


def hog_channels(patch_size: int) -> int:
    """C of the HOG target for patch size p: (p / 8)^2 cells x 3 channels x 9 bins."""
    check_patch_size("hog", patch_size)
    return (patch_size // HOG_CELL) ** 2 * 3 * HOG_BINS


def check_patch_size(name: str, patch_size: int) -> None:
    """Raise ValueError (one line) if teacher `name` cannot tile patches of size p."""
    if name == "hog" and (patch_size < HOG_CELL or patch_size % HOG_CELL):
        raise ValueError(f"teacher hog uses {HOG_CELL}x{HOG_CELL}-pixel cells: patch_size must be a multiple "
                         f"of {HOG_CELL}, got {patch_size}; use patch_size 8, 16 or 32, or teacher pixels")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify: images (B, 3, H, W) -> (B, N, p * p * 3), per patch in (p, q, c) order."""
    B, c, H, W = images.shape
    gh, gw = H // p, W // p
    x = images[..., :gh * p, :gw * p].reshape(B, c, gh, p, gw, p)  # (B, 3, gh, p, gw, q)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, gh, gw, p, q, 3)
    return x.reshape(B, gh * gw, p * p * c)  # (B, N, C)


def hog_cells(images: torch.Tensor, eps: float = HOG_EPS) -> torch.Tensor:
    """Per-cell, per-channel L2-normalized HOG: images (B, 3, H, W) -> (B, 3, 9, H // 8, W // 8).

    Computed in the images' dtype if float64 (for the skimage check), else in fp32.
    """
    x = images if images.dtype == torch.float64 else images.float()
    B, c, H, W = x.shape
    x = x[..., :H - H % HOG_CELL, :W - W % HOG_CELL].reshape(B * c, H - H % HOG_CELL, W - W % HOG_CELL)
    padded = F.pad(x[:, None], (1, 1, 1, 1), mode="reflect")[:, 0]  # (B * 3, h + 2, w + 2)
    # central differences as slices: the same two subtractions a [-1, 0, 1] convolution does, ~7x
    # faster on CPU than a one-channel conv2d
    g_row = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]  # x[i + 1, j] - x[i - 1, j]
    g_col = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]  # x[i, j + 1] - x[i, j - 1]
    magnitude = torch.hypot(g_row, g_col)  # (B * 3, h, w)
    # unsigned orientation in [0, 180): a bin index 0..8 per pixel (the clamp guards a float 180.0)
    degrees = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    # >= 0, so truncation is the floor; the lower clamp keeps a NaN pixel (its long() is the most
    # negative int64) a valid index: its NaN magnitude then makes that target NaN, as with the pools
    bins = (degrees / (180.0 / HOG_BINS)).long().clamp_(0, HOG_BINS - 1)
    hist = cell_histograms(magnitude, bins)  # (B * 3, 9, h / 8, w / 8)
    hist = hist / torch.sqrt(hist.square().sum(1, keepdim=True) + eps * eps)
    return hist.reshape(B, c, HOG_BINS, *hist.shape[-2:])  # (B, 3, 9, gh8, gw8)


def cell_histograms(magnitude: torch.Tensor, bins: torch.Tensor, scatter: bool | None = None) -> torch.Tensor:
    """Mean magnitude per (cell, bin): magnitude (R, h, w) float, bins (R, h, w) int64 in 0..8,
    h and w multiples of 8 -> (R, 9, h / 8, w / 8).

    scatter (default: off CUDA) adds every pixel into its (cell, bin) slot in one pass, ~20x faster
    than 9 masked average-pools on CPU; CUDA's scatter_add is atomic and so not bitwise repeatable,
    hence the pools there. Both sum each cell's 64 pixels and divide by 64.
    """
    R, h, w = magnitude.shape
    gh, gw = h // HOG_CELL, w // HOG_CELL
    if scatter is None:
        scatter = not magnitude.is_cuda
    if not scatter:
        return torch.stack([F.avg_pool2d((magnitude * (bins == b)).unsqueeze(1), HOG_CELL).squeeze(1)
                            for b in range(HOG_BINS)], dim=1)
    rows = torch.arange(h, device=bins.device) // HOG_CELL
    cols = torch.arange(w, device=bins.device) // HOG_CELL
    slot = (rows[:, None] * gw + cols[None, :]) * HOG_BINS + bins  # (R, h, w): cell * 9 + bin
    hist = magnitude.new_zeros(R, gh * gw * HOG_BINS)
    hist.scatter_add_(1, slot.reshape(R, -1), magnitude.reshape(R, -1)).div_(HOG_CELL * HOG_CELL)
    return hist.reshape(R, gh, gw, HOG_BINS).permute(0, 3, 1, 2)  # (R, 9, gh, gw)


def hog_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """HOG target: images (B, 3, H, W) -> (B, N, (p / 8)^2 * 27), cells of a patch concatenated."""
    B, _, H, W = images.shape
    gh, gw, k = H // p, W // p, p // HOG_CELL
    cells = hog_cells(images[..., :gh * p, :gw * p])  # (B, 3, 9, gh * k, gw * k)
    cells = cells.reshape(B, 3, HOG_BINS, gh, k, gw, k)  # (B, 3, 9, gh, kr, gw, kc)
    cells = cells.permute(0, 3, 5, 4, 6, 1, 2)  # (B, gh, gw, kr, kc, 3, 9)
    return cells.reshape(B, gh * gw, k * k * 3 * HOG_BINS).float()  # (B, N, C)


class WeightFreeTeacher(nn.Module):
    """`pixels` or `hog` behind the Teacher interface: (B, 3, H, W) -> (B, N, C) fp32, no weights.

    `.channels` C, `.stride` (pixels: p, the patch is its own cell; hog: 8, its cell),
    `.num_patches` at image_size, `.info` (a StageInfo with kind = the name).
    """

    def __init__(self, name: str, patch_size: int, image_size: int):
        super().__init__()
        if name not in WEIGHT_FREE_TEACHERS:
            raise ValueError(f"weight-free teacher must be one of {', '.join(WEIGHT_FREE_TEACHERS)}, got {name!r}")
        check_patch_size(name, patch_size)
        self.name, self.patch_size, self.image_size = name, patch_size, image_size
        if name == "pixels":
            self.info = StageInfo("pixels", 0, "patchify", patch_size, patch_size * patch_size * 3)
        else:
            self.info = StageInfo("hog", 0, f"hog{HOG_CELL}x{HOG_CELL}", HOG_CELL, hog_channels(patch_size))
        self.eval()

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def stride(self) -> int:
        return self.info.stride

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> "WeightFreeTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> targets (B, N, C) fp32, N = (H // p) * (W // p), row-major."""
        if self.name == "pixels":
            return patchify(images.float(), self.patch_size).contiguous()
        return hog_patches(images, self.patch_size).contiguous()


def peak_elements_per_image(name: str, image_size: int, patch_size: int) -> int:
    """Elements alive at the forward peak of a weight-free teacher, per image (memory estimate).

    pixels: the patchified copy (3 H W). hog: image + padded copy + gradients (2) + magnitude +
    orientation + bins + one masked magnitude (~8 x H W per channel, 3 channels), histograms
    are 64x smaller.
    """
    hw = image_size * image_size
    return 3 * hw if name == "pixels" else 8 * 3 * hw + math.ceil(3 * hw * HOG_BINS / HOG_CELL ** 2)
