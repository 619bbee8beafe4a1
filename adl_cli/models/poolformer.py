"""PoolFormer (Yu et al. 2022, "MetaFormer is Actually What You Need"): the token mixer is average
pooling over a k x k neighbourhood of the patch grid minus the token itself (so a constant input
maps to 0: the mixer adds only what differs from the neighbours); group normalisation with one
group (over every token and channel of an image)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models.image import TokenClassifier, TokenConfig, register_image_family


@dataclass
class PoolFormerConfig(TokenConfig):
    family: str = "poolformer"
    pool_size: int = 3

    def validate(self) -> None:
        super().validate()
        if self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"model.pool_size must be odd and >= 1, got {self.pool_size}")


class PoolMixer(nn.Module):
    def __init__(self, grid: int, pool_size: int):
        super().__init__()
        self.grid = grid
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        g = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return (self.pool(g) - g).reshape(b, d, n).transpose(1, 2)


class TokenGroupNorm(nn.Module):
    """GroupNorm with one group on (B, N, D) tokens: statistics over all N x D values of an image,
    an affine per channel."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean((1, 2), keepdim=True)
        var = x.var((1, 2), keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class PoolFormer(TokenClassifier):
    def __init__(self, cfg: PoolFormerConfig):
        super().__init__(cfg, lambda c: PoolMixer(c.grid, c.pool_size), positions="none", norm=TokenGroupNorm)


register_image_family("poolformer", PoolFormerConfig, PoolFormer)
