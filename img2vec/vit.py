"""The student: an MAE-style ViT encoder on visible patches, a light decoder with mask tokens,
and a linear head to the teacher's channel count.

Encoder parameter names equal timm's `VisionTransformer` (class token, global_pool="token",
num_classes=0), so `encoder.state_dict()` loads into timm with strict=True.

Letters: B batch, N patches, V visible, M masked, D encoder width, Dd decoder width,
C teacher channels, H heads, p patch size.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")


@dataclass(frozen=True)
class VitSize:
    width: int
    depth: int
    heads: int
    patch_size: int


# timm / MAE sizes; huge: 632M parameters at patch 14.
VIT_SIZES = {
    "vit_tiny": VitSize(192, 12, 3, 16),
    "vit_small": VitSize(384, 12, 6, 16),
    "vit_base": VitSize(768, 12, 12, 16),
    "vit_large": VitSize(1024, 24, 16, 16),
    "vit_huge": VitSize(1280, 32, 16, 14),
}


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE): (1, grid*grid [+1], dim), zeros for cls."""
    assert dim % 4 == 0, f"sin-cos position embedding needs width divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # row-major patch order
    def embed_1d(pos):  # (N,) -> (N, dim/2)
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    # MAE puts the width (x) half first; keep that so our embeddings equal MAE's.
    emb = torch.cat([embed_1d(gx), embed_1d(gy)], dim=1)  # (N, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention; `impl` picks the kernel (math is the reference)."""

    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa"):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        if self.impl == "xformers":
            import xformers.ops as xops

            q, k, v = qkv.unbind(2)  # each (B, T, H, hd)
            out = xops.memory_efficient_attention(q, k, v).reshape(B, T, D)
            return self.proj(out)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if self.impl == "math":
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
            out = attn.softmax(dim=-1) @ v  # (B, H, T, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with timm's names (norm1, attn, norm2, mlp); `drop_path` > 0
    drops each residual branch per sample (stochastic depth, timm's DropPath: no parameters, so
    the names stay timm's)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "sdpa",
                 drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


def _init_weights(module: nn.Module) -> None:
    # MAE: xavier-uniform linears, zero biases, unit layer norms; patch conv as a linear.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed):
        nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
        nn.init.zeros_(module.proj.bias)


class VitEncoder(nn.Module):
    """ViT encoder that runs on visible patches only. State-dict names == timm VisionTransformer."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, attn_impl: str = "sdpa", grad_ckpt: int = 0, drop_path: float = 0.0):
        super().__init__()
        assert image_size % patch_size == 0
        self.grad_ckpt = grad_ckpt  # the first `grad_ckpt` blocks recompute activations in backward
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.depth, self.heads, self.mlp_ratio = depth, heads, mlp_ratio
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # Fixed, not learned (MAE); a Parameter only so timm finds `pos_embed` in the export.
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, self.grid, cls_token=True), requires_grad=False)
        # Stochastic depth grows linearly with depth to `drop_path` at the last block (timm, dBOT).
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # python: meta-device safe
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, attn_impl, rates[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W), ids_keep (B, V) or None for all patches -> (B, 1 + V, D)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # (B, N, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, V, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + V, D)
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            # Activation checkpointing trades one extra block forward for not keeping the
            # block's activations: what lets ViT-H fit a useful micro-batch.
            x = checkpoint(block, x, use_reentrant=False) if recompute and i < self.grad_ckpt else block(x)
        return self.norm(x)

    def timm_kwargs(self) -> dict:
        """Arguments of timm.models.vision_transformer.VisionTransformer that match this encoder."""
        return dict(img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.width,
                    depth=self.depth, num_heads=self.heads, mlp_ratio=self.mlp_ratio,
                    num_classes=0, global_pool="token", class_token=True)


class Decoder(nn.Module):
    """MAE decoder: mask tokens fill the masked slots, a few blocks, a linear head to C."""

    def __init__(self, grid: int, in_width: int, width: int, depth: int, heads: int, out_channels: int,
                 attn_impl: str = "sdpa"):
        super().__init__()
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, grid, cls_token=True), requires_grad=False)
        self.blocks = nn.ModuleList([Block(width, heads, 4.0, attn_impl) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_channels)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """latent (B, 1 + V, D), ids_restore (B, N) -> pred (B, N, C) in patch order, or
        (B, M, C) for the patches in ids_masked (B, M) only: the loss scores only those, so
        the head skips the visible ones and the gradient is B*M*C, not a zero-filled B*N*C."""
        x = self.embed(latent)  # (B, 1 + V, Dd)
        B, N = ids_restore.shape
        masks = self.mask_token.expand(B, N - (x.shape[1] - 1), -1)  # (B, M, Dd)
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # (B, N, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, Dd)
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed  # (B, 1 + N, Dd)
        for block in self.blocks:
            x = block(x)
        x = x[:, 1:]  # (B, N, Dd), patch order
        if ids_masked is not None:
            x = torch.gather(x, 1, ids_masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, M, Dd)
        return self.head(self.norm(x))  # (B, N or M, C)


class Img2VecStudent(nn.Module):
    """Encoder + decoder: what the DeepSpeed engine trains. The teacher lives outside it."""

    def __init__(self, encoder: VitEncoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                ids_masked: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W), ids_keep (B, V), ids_restore (B, N), ids_masked (B, M)
        -> pred (B, M, C) in the order of ids_masked, or (B, N, C) when ids_masked is None."""
        return self.decoder(self.encoder(images, ids_keep), ids_restore, ids_masked)


def build_student(model: str, image_size: int, patch_size: int, out_channels: int,
                  decoder_depth: int, decoder_width: int, decoder_heads: int,
                  attn_impl: str = "sdpa", grad_ckpt: int = 0, drop_path: float = 0.0) -> Img2VecStudent:
    """Size factory: model in VIT_SIZES, patch_size 0 means the size's default;
    grad_ckpt = number of encoder blocks (from the first) that recompute activations;
    drop_path = the encoder's stochastic depth at its last block (the decoder has none, as in dBOT)."""
    size = VIT_SIZES[model]
    encoder = VitEncoder(image_size, patch_size or size.patch_size, size.width, size.depth, size.heads,
                         attn_impl=attn_impl, grad_ckpt=grad_ckpt, drop_path=drop_path)
    decoder = Decoder(encoder.grid, size.width, decoder_width, decoder_depth, decoder_heads, out_channels, attn_impl)
    return Img2VecStudent(encoder, decoder)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
