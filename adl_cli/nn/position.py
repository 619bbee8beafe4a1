"""Positional information by name: none, learned, sinusoidal, rope (+ pi, ntk, yarn), alibi.

Each encoding is an ``nn.Module`` with three hooks; a model calls all three and each
encoding implements the ones it needs:

- ``embed(pos) -> (T, C) | None``: added to the token embeddings (learned, sinusoidal);
- ``rotate(x, pos) -> x``: applied to queries and keys, x: (B, H, T, D) (RoPE family);
- ``bias(n_head, q_pos, k_pos) -> (H, Tq, Tk) | None``: added to attention scores (ALiBi).

``pos`` holds absolute positions (a LongTensor of shape (T,)), so decoding with a cache
passes the positions of the new tokens only. Options come as keyword arguments (a
model's ``position_options``); an unknown or ill-typed option is a ValueError that
names it and the allowed ones.

RoPE (Su et al., "RoFormer", 2021): rotate each pair (x_{2i}, x_{2i+1}) by the angle
pos * theta^(-2i/D); then <R(m)q, R(n)k> depends only on m - n. The context-extension
variants of RoPE (pi, ntk, yarn) live in ``rope_scaling.py``; ``with_position`` swaps
one for another in a trained model (RoPE has nothing learned).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from adl_cli.errors import closest
from adl_cli.registry import Registry

POSITIONS = Registry("position")


def register(name: str):
    """Register a position class under ``name`` and record the name on the class."""

    def deco(cls):
        cls.name = name
        return POSITIONS.register(name)(cls)

    return deco


class PositionEncoding(nn.Module):
    """Base class. ``OPTIONS`` maps each accepted option to its default."""

    name = "position"
    OPTIONS: dict[str, Any] = {}

    def __init__(self, *, n_embd: int, head_dim: int, n_head: int, block_size: int, **options):
        super().__init__()
        for key in options:
            if key not in self.OPTIONS:
                allowed = ", ".join(sorted(self.OPTIONS)) or "(none)"
                raise ValueError(
                    f"position '{self.name}' has no option '{key}'{closest(key, self.OPTIONS)}; allowed options: {allowed}"
                )
        self.n_embd, self.head_dim, self.n_head, self.block_size = n_embd, head_dim, n_head, block_size
        self.options = {**self.OPTIONS, **options}

    def number(self, key: str, *, minimum: float | None = None, above: float | None = None) -> float:
        """The option ``key`` as a float, checked against a bound; the error names the option."""
        value = self.options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"position '{self.name}' option '{key}' must be a number, got {value!r}")
        value = float(value)
        if minimum is not None and value < minimum:
            raise ValueError(f"position '{self.name}' option '{key}' must be >= {minimum}, got {value}")
        if above is not None and value <= above:
            raise ValueError(f"position '{self.name}' option '{key}' must be > {above}, got {value}")
        return value

    def embed(self, pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x

    def bias(self, n_head: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None


@register("none")
class NoPosition(PositionEncoding):
    """No positional signal (NoPE): causal masking alone tells order."""


@register("learned")
class LearnedPosition(PositionEncoding):
    """A learned table of block_size vectors added to the token embeddings (GPT-2)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.wpe = nn.Embedding(self.block_size, self.n_embd)

    def embed(self, pos):
        # The check reads a tensor value (a graph break under torch.compile); GPT.hidden already
        # checks lengths with Python ints, so compiled training skips it.
        if not torch.compiler.is_compiling() and pos.numel() and int(pos.max()) >= self.block_size:
            raise ValueError(f"position {int(pos.max())} is past the learned table of {self.block_size}")
        return self.wpe(pos)


def sinusoid_table(pos: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)); float64, (T, dim)."""
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = pos.detach().to("cpu", torch.float64)[:, None] * freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


@register("sinusoidal")
class SinusoidalPosition(PositionEncoding):
    """Fixed sines and cosines added to the token embeddings (Vaswani et al., 2017):

        PE(p, 2i) = sin(p / 10000^(2i/C)),   PE(p, 2i+1) = cos(p / 10000^(2i/C)).

    Defined for every position: rows past ``block_size`` are computed on demand.
    """

    OPTIONS = {"base": 10000.0}

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        self.base = self.number("base", above=1.0)
        table = sinusoid_table(torch.arange(self.block_size), self.n_embd, self.base).float()
        self.register_buffer("table", table, persistent=False)

    def embed(self, pos):
        if torch.compiler.is_compiling() or pos.numel() == 0 or int(pos.max()) < self.table.shape[0]:
            return self.table[pos]
        return sinusoid_table(pos, self.n_embd, self.base).to(self.table.device, self.table.dtype)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """theta^(-2i/D) for i = 0 .. D/2 - 1."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim: cos/sin are (T, D/2), or (B, T, D/2) for per-row
    positions (a left-padded batch), which meet x (B, H, T, D) across its heads."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3 and x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


@register("rope")
class RotaryPosition(PositionEncoding):
    """RoPE. Subclasses change ``compute_inv_freq`` (and ``attention_factor``, which
    multiplies cos and sin, so the scores of rotated q and k scale by its square)."""

    OPTIONS = {"theta": 10000.0}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.theta = self.number("theta", above=1.0)
        self.attention_factor = 1.0
        inv_freq = self.compute_inv_freq().double()
        # The float64 copy feeds the cos/sin cache: large positions keep their precision
        # even after the model is cast to a low-precision dtype.
        self._inv_freq64 = inv_freq
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def compute_inv_freq(self) -> torch.Tensor:
        return rope_inv_freq(self.head_dim, self.theta)

    def with_head_dim(self, head_dim: int) -> RotaryPosition:
        """The same encoding and options for another rotary width (MLA's decoupled keys)."""
        return type(self)(
            n_embd=self.n_embd, head_dim=head_dim, n_head=self.n_head, block_size=self.block_size, **self.options
        )

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        if torch.compiler.is_compiling():
            # Compiled training stays within block_size: size the table by it instead of reading
            # pos (a data-dependent size check is a graph break inside the compiled graph).
            if cache is None or cache[1] != pos.device:
                cache = self._build(self.block_size, pos.device)
            return cache[2][pos], cache[3][pos]
        n = int(pos.max()) + 1 if pos.numel() else 0
        if cache is None or cache[0] < n or cache[1] != pos.device:
            # Grow geometrically past block_size so that long decoding rebuilds rarely.
            cache = self._build(max(n, self.block_size, 2 * cache[0] if cache is not None and cache[0] < n else 0), pos.device)
        return cache[2][pos], cache[3][pos]

    def _build(self, size: int, device: torch.device):
        angles = torch.arange(size, dtype=torch.float64)[:, None] * self._inv_freq64
        f = self.attention_factor
        self._cache = (size, device, (angles.cos() * f).float().to(device), (angles.sin() * f).float().to(device))
        return self._cache

    def rotate(self, x, pos):
        cos, sin = self._cos_sin(pos)
        return apply_rotary(x, cos, sin)


def alibi_slopes(n_head: int) -> list[float]:
    """Head slopes m_h: 2^(-8h/H) for h = 1..H when H is a power of two. Otherwise take
    the slopes for the power of two n just below H, then every other slope of the 2n-head
    sequence (2^(-4h/n), odd h) for the H - n heads left (Press et al., 2021)."""
    if n_head < 1:
        raise ValueError(f"ALiBi needs at least one head, got {n_head}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 2 ** int(math.floor(math.log2(n_head)))
    if n == n_head:
        return power_of_two(n)
    return power_of_two(n) + power_of_two(2 * n)[0::2][: n_head - n]


@register("alibi")
class ALiBiPosition(PositionEncoding):
    """Attention with Linear Biases (Press et al., "Train Short, Test Long", 2021):

        score(i, j) = q_i . k_j / sqrt(d) - m_h |i - j|

    with head slopes m_h from ``alibi_slopes``; nothing is added to the embeddings. For
    causal attention |i - j| = i - j on every pair the mask keeps.
    """

    def bias(self, n_head, q_pos, k_pos):
        slopes = torch.tensor(alibi_slopes(n_head), dtype=torch.float32, device=q_pos.device)
        dist = (q_pos[:, None] - k_pos[None, :]).abs().to(torch.float32)
        return -slopes[:, None, None] * dist


def with_position(model: nn.Module, name: str, **options) -> PositionEncoding:
    """Swap ``model.transformer.pos`` for the position ``name`` built with ``options``;
    return the module it replaced.

    Only parameter-free swaps are allowed, so nothing learned is lost: any RoPE variant
    for any other (rope, pi, ntk, yarn: e.g. YaRN at evaluation time on a model trained
    with plain RoPE), or a non-learned encoding for another of its own kind with new
    options. ``model.config.position``/``position_options`` follow the swap. MLA blocks
    derive their decoupled rotary from the module they are given, so they follow too.
    """
    old = model.transformer.pos
    cls = POSITIONS.get(name)
    same_family = isinstance(old, RotaryPosition) and issubclass(cls, RotaryPosition)
    if not (same_family or type(old) is cls) or any(True for _ in old.parameters()):
        raise ValueError(
            f"cannot swap position '{old.name}' for '{name}' without retraining; "
            "with_position swaps RoPE variants (rope, pi, ntk, yarn) among themselves, "
            "or a parameter-free encoding for itself with other options"
        )
    new = cls(n_embd=old.n_embd, head_dim=old.head_dim, n_head=old.n_head, block_size=old.block_size, **options)
    buffers = list(old.buffers())
    if buffers:
        new.to(buffers[0].device)
    model.transformer.pos = new
    config = getattr(model, "config", None)
    if config is not None:
        config.position, config.position_options = name, dict(options)
    return old


@contextlib.contextmanager
def swapped_position(model: nn.Module, name: str, **options):
    """``with swapped_position(model, "yarn", scale=4.0): ...`` then restore the original."""
    config = getattr(model, "config", None)
    saved = (config.position, dict(config.position_options)) if config is not None else None
    old = with_position(model, name, **options)
    try:
        yield model.transformer.pos
    finally:
        model.transformer.pos = old
        if saved is not None:
            config.position, config.position_options = saved


# Importing the scalings registers pi, ntk and yarn.
from adl_cli.nn import rope_scaling  # noqa: E402,F401
