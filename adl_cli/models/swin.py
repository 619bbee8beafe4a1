"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

Attention inside non-overlapping ws x ws windows of the token grid, with a learned relative
position bias B[dy, dx] per head (a (2ws - 1)^2 table indexed by the offset between two tokens);
every other block shifts the grid by ws // 2 (a cyclic roll) so that windows straddle the
previous ones' borders, and masks the pairs that the roll brought together from different image
regions. Between stages, patch merging concatenates each 2x2 neighbourhood (4C) and projects it to
2C. When a window covers the whole grid the shift is dropped (nothing to straddle) and the block
is global attention with the relative bias. Mean pooling, a linear head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adl_cli.models.image import ImageConfig, ImageModel, _init, register_image_family
from adl_cli.nn.vision import MLP, PatchEmbed, attend


@dataclass
class SwinConfig(ImageConfig):
    family: str = "swin"
    patch: int = 1
    dim: int = 48
    depths: list[int] = field(default_factory=lambda: [2, 2])  # blocks per stage; a patch merging between stages
    heads: list[int] = field(default_factory=lambda: [3, 6])
    window: int = 4
    mlp_ratio: float = 2.0

    def validate(self) -> None:
        super().validate()
        if len(self.depths) != len(self.heads) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"model.depths and model.heads need one positive entry per stage, got {self.depths} and {self.heads}")
        if self.image_size % self.patch:
            raise ValueError(f"model.patch {self.patch} must divide the image size {self.image_size}")
        if not self.image_size:  # a recipe's config: the grid checks wait for the data
            return
        res = self.image_size // self.patch
        for i, h in enumerate(self.heads):
            width = self.dim * 2 ** i
            if width % h:
                raise ValueError(f"model.heads[{i}] = {h} must divide stage {i}'s width {width}")
            if res % min(self.window, res):
                raise ValueError(f"model.window {self.window} must divide stage {i}'s grid {res}")
            if i < len(self.depths) - 1:
                if res % 2:
                    raise ValueError(f"stage {i}'s grid {res} is odd: patch merging needs an even grid (fewer stages or a larger image)")
                res //= 2


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws * ws, C): windows in row-major order, tokens row-major inside."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """The inverse of window_partition."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_index(ws: int) -> torch.Tensor:
    """(ws^2, ws^2) index into the (2ws - 1)^2 bias table of each pair's (dy, dx) offset."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, ws^2)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # offsets shifted to 0..2ws-2
    return rel[0] * (2 * ws - 1) + rel[1]


def shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(windows, ws^2, ws^2) additive mask of the shifted grid: 0 where two tokens of a window come
    from the same region of the unrolled image, -inf where the roll joined different regions."""
    region = torch.zeros(h, w, dtype=torch.long)
    bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for wsl in bounds:
            region[hs, wsl] = label
            label += 1
    win = window_partition(region[None, :, :, None], ws)[..., 0]  # (windows, ws^2)
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, float("-inf"))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.ws, self.dropout = heads, ws, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", relative_index(ws), persistent=False)
        self.keep, self.map = False, None  # keep: store the weights (B * windows, heads, ws^2, ws^2) in map

    def bias(self) -> torch.Tensor:
        """(heads, ws^2, ws^2) relative position bias."""
        return self.table[self.index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * windows, ws^2, C); mask: (windows, ws^2, ws^2) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias()[None]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.expand(bw // nw, nw, *bias.shape[1:]) + mask[None, :, None]).reshape(bw, self.heads, n, n)
        y = attend(q, k, v, bias=bias, dropout=self.dropout if self.training else 0.0, keep=self if self.keep else None)
        return self.proj(y.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, res: int, window: int, shift: bool, mlp_ratio: float, dropout: float):
        super().__init__()
        self.res = res
        self.ws = min(window, res)
        self.shift = self.ws // 2 if shift and window < res else 0
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, self.ws, dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio), dropout)
        if self.shift:
            self.register_buffer("mask", shift_mask(res, res, self.ws, self.shift), persistent=False)
        else:
            self.mask = None

    def received(self) -> torch.Tensor:
        """After a forward with ``attn.keep``: (B, res, res) the attention each token received from
        the queries of its window (mean over heads, summed over queries), in image positions."""
        m = self.attn.map.mean(1).sum(1)  # (B * windows, ws^2)
        grid = window_reverse(m[..., None], self.ws, self.res, self.res)[..., 0]
        return torch.roll(grid, (self.shift, self.shift), dims=(1, 2)) if self.shift else grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, res * res, C), row-major."""
        b, n, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, self.ws), self.mask), self.ws, self.res, self.res)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """(B, res^2, C) -> (B, (res/2)^2, 2C): each 2x2 neighbourhood's four tokens concatenated, normed, projected."""

    def __init__(self, dim: int, res: int):
        super().__init__()
        self.res = res
        self.norm, self.reduce = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        g = x.view(b, self.res, self.res, c)
        cat = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
        return self.reduce(self.norm(cat.reshape(b, -1, 4 * c)))


class Swin(ImageModel):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = PatchEmbed(cfg.image_size, cfg.patch, cfg.channels, cfg.dim)
        res, dim = self.embed.grid, cfg.dim
        layers: list[nn.Module] = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads)):
            if i:
                layers.append(PatchMerging(dim, res))
                res, dim = res // 2, dim * 2
            layers += [SwinBlock(dim, heads, res, cfg.window, j % 2 == 1, cfg.mlp_ratio, cfg.dropout) for j in range(depth)]
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.apply(_init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(x))).mean(1)

    def window_attention_maps(self, x: torch.Tensor) -> list[tuple[SwinBlock, torch.Tensor]]:
        """The first stage's blocks with the attention each token received on ``x`` (B, res, res)."""
        blocks = []
        for layer in self.layers:
            if isinstance(layer, PatchMerging):
                break
            blocks.append(layer)
        for b in blocks:
            b.attn.keep = True
        try:
            with torch.no_grad():
                self.features(x)
            return [(b, b.received()) for b in blocks]
        finally:
            for b in blocks:
                b.attn.keep, b.attn.map = False, None


register_image_family("swin", SwinConfig, Swin)
