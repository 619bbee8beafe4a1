"""Axial attention (Ho et al. 2019, "Axial Attention in Multidimensional Transformers"; Wang et al.
2020, Axial-DeepLab): full attention over an H x W grid costs (HW)^2; attending along each row,
then along each column, costs HW(H + W) and still lets every position reach every other in one
block (through the row, then the column). Each block: x + row(norm x), then + column(...), then
the MLP; learned positions, mean pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models.image import TokenClassifier, TokenConfig, register_image_family
from adl_cli.nn.vision import SelfAttention


@dataclass
class AxialConfig(TokenConfig):
    family: str = "axial"
    heads: int = 4

    def validate(self) -> None:
        super().validate()
        if self.dim % self.heads:
            raise ValueError(f"model.heads {self.heads} must divide model.dim {self.dim}")


class AxialAttention(nn.Module):
    """Row attention then column attention over (B, H*W, D) tokens of an H x W grid (row-major),
    each with its residual: y = x + row(x); out = y - x + column(y) (the block adds x back)."""

    def __init__(self, grid: int, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.grid = grid
        self.row, self.col = SelfAttention(dim, heads, dropout), SelfAttention(dim, heads, dropout)

    def along_rows(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        g = self.grid
        return self.row(x.reshape(b * g, g, d)).reshape(b, n, d)

    def along_columns(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        g = self.grid
        cols = x.reshape(b, g, g, d).transpose(1, 2).reshape(b * g, g, d)
        return self.col(cols).reshape(b, g, g, d).transpose(1, 2).reshape(b, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.along_rows(x)
        return y - x + self.along_columns(y)


class Axial(TokenClassifier):
    def __init__(self, cfg: AxialConfig):
        super().__init__(cfg, lambda c: AxialAttention(c.grid, c.dim, c.heads, c.dropout), positions="learned")


register_image_family("axial", AxialConfig, Axial)
