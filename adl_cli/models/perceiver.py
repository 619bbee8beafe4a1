"""Perceiver (Jaegle et al. 2021, "General Perception with Iterative Attention").

A small learned latent array (M x D) cross-attends to the input, here every pixel as a token of its
channel values and Fourier features of its position (per axis: the coordinate in [-1, 1] and
sin / cos of pi f_k times it for bands f_k evenly spaced from 1 to half the image size, the
Nyquist rate), so the cost is linear in the number of pixels; latent self-attention blocks follow;
cross-attention and latent blocks repeat, with weights shared after the first round (the paper's
choice). The latents' mean is classified. Without position features the model sees a set of pixels:
it is invariant to permuting them (a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models.image import ImageConfig, ImageModel, _init, register_image_family
from adl_cli.nn.vision import MLP, Residual, SelfAttention, attend


@dataclass
class PerceiverConfig(ImageConfig):
    family: str = "perceiver"
    latents: int = 32
    dim: int = 64
    heads: int = 4  # latent self-attention
    cross_heads: int = 1
    depth: int = 2  # latent self-attention blocks per round
    rounds: int = 2  # cross-attention + latent blocks, repeated
    share_weights: bool = True  # rounds after the first share one set of weights
    positions: str = "fourier"  # fourier | none
    bands: int = 8
    mlp_ratio: float = 2.0

    def validate(self) -> None:
        super().validate()
        for name in ("latents", "dim", "heads", "cross_heads", "depth", "rounds", "bands"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("heads", "cross_heads"):
            if self.dim % getattr(self, name):
                raise ValueError(f"model.{name} {getattr(self, name)} must divide model.dim {self.dim}")
        if self.positions not in ("fourier", "none"):
            raise ValueError(f"model.positions must be fourier or none, got '{self.positions}'")


def fourier_features(size: int, bands: int) -> torch.Tensor:
    """(size * size, 2 (2 bands + 1)) position features of the pixels, row-major."""
    coords = torch.linspace(-1.0, 1.0, size)
    freqs = torch.linspace(1.0, size / 2, bands)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (ys.flatten(), xs.flatten()):
        angle = math.pi * c[:, None] * freqs[None]
        parts += [c[:, None], angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


class CrossAttention(nn.Module):
    """Latents (B, M, D) attend to inputs (B, N, E): queries from the latents, keys and values from
    the inputs; ``keep`` stores the weights (B, heads, M, N) in ``map``."""

    def __init__(self, dim: int, input_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(input_dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(input_dim, 2 * dim), nn.Linear(dim, dim)
        self.keep, self.map = False, None

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, m, d = z.shape
        n = x.shape[1]
        q = self.q(self.norm_q(z)).view(b, m, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(self.norm_kv(x)).view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, dropout=self.dropout if self.training else 0.0, keep=self if self.keep else None)
        return self.proj(y.transpose(1, 2).reshape(b, m, d))


class Round(nn.Module):
    """z + cross(z, x), + MLP, then the latent self-attention blocks."""

    def __init__(self, cfg: PerceiverConfig, input_dim: int):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.cross = CrossAttention(cfg.dim, input_dim, cfg.cross_heads, cfg.dropout)
        self.norm, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg.dim, hidden, cfg.dropout)
        self.blocks = nn.ModuleList(Residual(cfg.dim, SelfAttention(cfg.dim, cfg.heads, cfg.dropout), hidden, cfg.dropout)
                                    for _ in range(cfg.depth))

    def forward(self, z, x):
        z = z + self.cross(z, x)
        z = z + self.mlp(self.norm(z))
        for block in self.blocks:
            z = block(z)
        return z


class Perceiver(ImageModel):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        feats = fourier_features(cfg.image_size, cfg.bands) if cfg.positions == "fourier" else torch.zeros(cfg.image_size ** 2, 0)
        self.register_buffer("pos", feats, persistent=False)
        input_dim = cfg.channels + feats.shape[1]
        self.latents = nn.Parameter(torch.randn(cfg.latents, cfg.dim) * 0.02)
        n_sets = min(cfg.rounds, 2) if cfg.share_weights else cfg.rounds
        self.rounds = nn.ModuleList(Round(cfg, input_dim) for _ in range(n_sets))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(_init)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C + position features): a token per pixel."""
        b, c = x.shape[:2]
        pix = x.reshape(b, c, -1).transpose(1, 2)
        return torch.cat([pix, self.pos[None].expand(b, -1, -1).to(pix.dtype)], dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.inputs(x)
        z = self.latents[None].expand(len(x), -1, -1)
        for r in range(self.config.rounds):
            z = self.rounds[min(r, len(self.rounds) - 1)](z, inp)
        return self.norm(z).mean(1)

    def cross_attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The first round's cross-attention weights (B, heads, latents, pixels) on ``x`` (caught as
        that call returns: a later round with the same, shared module overwrites ``map``)."""
        cross = self.rounds[0].cross
        seen: list[torch.Tensor] = []
        handle = cross.register_forward_hook(lambda m, a, o: seen.append(m.map))
        cross.keep = True
        try:
            with torch.no_grad():
                self.features(x)
        finally:
            cross.keep, cross.map = False, None
            handle.remove()
        return seen[0]


register_image_family("perceiver", PerceiverConfig, Perceiver)
