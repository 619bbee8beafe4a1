"""Positional information by name: learned, rope (and the variants added beside them).

Each encoding is an ``nn.Module`` with three hooks; a model calls all three and each
encoding implements the ones it needs:

- ``embed(pos) -> (T, C) | None``: added to the token embeddings (learned, sinusoidal);
- ``rotate(x, pos) -> x``: applied to queries and keys, x: (B, H, T, D) (RoPE family);
- ``bias(n_head, q_pos, k_pos) -> (H, Tq, Tk) | None``: added to attention scores (ALiBi).

``pos`` holds absolute positions (a LongTensor of shape (T,)), so decoding with a cache
passes the positions of the new tokens only.

RoPE (Su et al., "RoFormer", 2021): rotate each pair (x_{2i}, x_{2i+1}) by the angle
pos * theta^(-2i/D); then <R(m)q, R(n)k> depends only on m - n.
"""

from __future__ import annotations

import torch
from torch import nn

from adl_cli.registry import Registry

POSITIONS = Registry("position")


class PositionEncoding(nn.Module):
    def __init__(self, *, n_embd: int, head_dim: int, n_head: int, block_size: int, **options):
        super().__init__()
        if options:
            raise ValueError(f"{type(self).__name__} takes no options {sorted(options)}")
        self.n_embd, self.head_dim, self.n_head, self.block_size = n_embd, head_dim, n_head, block_size

    def embed(self, pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x

    def bias(self, n_head: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None


@POSITIONS.register("none")
class NoPosition(PositionEncoding):
    """No positional signal (NoPE): causal masking alone tells order."""


@POSITIONS.register("learned")
class LearnedPosition(PositionEncoding):
    """A learned table of block_size vectors added to the token embeddings (GPT-2)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.wpe = nn.Embedding(self.block_size, self.n_embd)

    def embed(self, pos):
        if pos.numel() and int(pos.max()) >= self.block_size:
            raise ValueError(f"position {int(pos.max())} is past the learned table of {self.block_size}")
        return self.wpe(pos)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """theta^(-2i/D) for i = 0 .. D/2 - 1."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim: cos/sin are (T, D/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


@POSITIONS.register("rope")
class RotaryPosition(PositionEncoding):
    """RoPE. Subclasses change ``inv_freq`` (and ``attention_factor``) for context extension."""

    def __init__(self, *, theta: float = 10000.0, **kw):
        super().__init__(**kw)
        self.theta = theta
        self.attention_factor = 1.0
        self.register_buffer("inv_freq", self.compute_inv_freq().float(), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def compute_inv_freq(self) -> torch.Tensor:
        return rope_inv_freq(self.head_dim, self.theta)

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(pos.max()) + 1 if pos.numel() else 0
        cache = self._cache
        if cache is None or cache[0] < n or cache[1] != pos.device:
            size = max(n, self.block_size)
            angles = torch.arange(size, device=pos.device, dtype=torch.float32)[:, None] * self.inv_freq.to(pos.device)
            cache = (size, pos.device, angles.cos() * self.attention_factor, angles.sin() * self.attention_factor)
            self._cache = cache
        return cache[2][pos], cache[3][pos]

    def rotate(self, x, pos):
        cos, sin = self._cos_sin(pos)
        return apply_rotary(x, cos, sin)
