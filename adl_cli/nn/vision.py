"""Layers the image model families share: patches, 2-D positions, the pre-norm residual block.

    PatchEmbed     non-overlapping p x p patches flattened (unfold) and projected by one linear map:
                   the same function as a Conv2d with kernel = stride = p (tests check it)
    sincos_2d      fixed 2-D sine-cosine positions (half the width encodes the row, half the column;
                   MAE's and "Better plain ViT baselines"' choice)
    Residual       x + mixer(norm(x)) then x + mlp(norm(x)): the block of ViT, MLP-Mixer, PoolFormer and
                   FNet, which differ only in the token mixer
    SelfAttention  multi-head attention over tokens, keeping its attention map on request (plots)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch: int, channels: int, dim: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"model.patch {patch} must divide the image size {image_size}")
        self.patch, self.grid = patch, image_size // patch
        self.proj = nn.Linear(channels * patch * patch, dim)

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, dim), patches in row-major order."""
        p = self.patch
        cols = F.unfold(x, kernel_size=p, stride=p)  # (B, C*p*p, N), channel-major within a patch like Conv2d's weight
        return self.proj(cols.transpose(1, 2))


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid * grid, dim) fixed positions: the first half of the width sines and cosines of the row,
    the second of the column, at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    freq = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention; ``keep`` stores the last attention map
    (B, heads, N, N) in ``self.map`` for plots (the explicit softmax path)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.heads {heads} must divide model.dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.keep = False
        self.map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, bias=bias, dropout=self.dropout if self.training else 0.0, keep=self if self.keep else None)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


def attend(q, k, v, *, bias=None, dropout=0.0, keep=None):
    """softmax(q k^T / sqrt(d) + bias) v over the last two axes; ``keep``: an object whose ``map``
    receives the attention weights (then computed explicitly)."""
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=dropout)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    w = s.softmax(-1)
    keep.map = w.detach()
    return F.dropout(w, dropout) @ v


class Residual(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) (pre-norm)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_hidden: int, dropout: float = 0.0, norm=nn.LayerNorm):
        super().__init__()
        self.norm1, self.mixer = norm(dim), mixer
        self.norm2, self.mlp = norm(dim), MLP(dim, mlp_hidden, dropout)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))
