"""RoPE context extension: change the rotary frequencies theta_i = theta^(-2i/D) so a
model trained on L tokens reads s L tokens (s = ``scale``; s = 1 is plain RoPE).

- pi   (Chen et al., "Extending Context Window of LLMs via Positional Interpolation",
        2023): m -> m / s, i.e. theta_i -> theta_i / s for every dimension.
- ntk  ("NTK-aware" scaling, bloc97, 2023): raise the base, theta -> theta s^(D/(D-2)),
        so the fastest pair is untouched and the slowest is interpolated by s.
- yarn (Peng et al., "YaRN: Efficient Context Window Extension of LLMs", 2023): pair i
        (theta_i = theta^(-2i/D)) turns r_i = L theta_i / (2 pi) times in the training
        length L. The pair index that turns exactly b times is

            d(b) = D ln(L / (2 pi b)) / (2 ln theta)

        and the blend is a linear ramp in the pair index between lo = floor(d(beta_fast))
        and hi = ceil(d(beta_slow)) (clipped to [0, D - 1]), as in the authors' code:

            gamma_i = 1 - clamp((i - lo) / (hi - lo), 0, 1)
            theta_i' = (1 - gamma_i) theta_i / s + gamma_i theta_i

        (fast pairs, i <= lo, extrapolate; slow ones, i >= hi, interpolate), and the
        attention temperature sqrt(1/t) = 0.1 ln(s) + 1 multiplies q and k.

Nothing here is learned, so ``position.with_position`` can switch a trained RoPE model
to any of these at evaluation time.
"""

from __future__ import annotations

import math

import torch

from adl_cli.nn.position import RotaryPosition, register, rope_inv_freq


@register("pi")
class InterpolatedRotary(RotaryPosition):
    """Position interpolation: theta_i / s (positions squeezed into the trained range)."""

    OPTIONS = {"theta": 10000.0, "scale": 1.0}

    def compute_inv_freq(self):
        return rope_inv_freq(self.head_dim, self.theta) / self.number("scale", minimum=1.0)


@register("ntk")
class NTKRotary(RotaryPosition):
    """NTK-aware scaling: base theta * s^(D/(D-2))."""

    OPTIONS = {"theta": 10000.0, "scale": 1.0}

    def compute_inv_freq(self):
        scale, d = self.number("scale", minimum=1.0), self.head_dim
        if d <= 2:
            raise ValueError(f"position 'ntk' needs head_dim > 2, got {d}")
        return rope_inv_freq(d, self.theta * scale ** (d / (d - 2)))


def yarn_inv_freq(
    head_dim: int, theta: float, scale: float, original_max_position: int, beta_fast: float, beta_slow: float
) -> torch.Tensor:
    """YaRN's per-pair blend of interpolation (theta_i / s) and extrapolation (theta_i)."""
    inv_freq = rope_inv_freq(head_dim, theta)

    def pair_turning(b: float) -> float:  # d(b): the (fractional) pair index turning b times in L
        return head_dim * math.log(original_max_position / (2 * math.pi * b)) / (2 * math.log(theta))

    lo = max(math.floor(pair_turning(beta_fast)), 0)
    hi = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)
    span = hi - lo if hi != lo else 0.001
    i = torch.arange(head_dim // 2, dtype=inv_freq.dtype)
    gamma = 1.0 - ((i - lo) / span).clamp(0.0, 1.0)  # 1: extrapolate (fast pairs), 0: interpolate
    return (1 - gamma) * inv_freq / scale + gamma * inv_freq


def yarn_attention_factor(scale: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (1 when s <= 1)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


@register("yarn")
class YaRNRotary(RotaryPosition):
    """YaRN: ramped interpolation by wavelength plus the attention temperature.
    ``original_max_position`` (the training context) defaults to block_size."""

    OPTIONS = {"theta": 10000.0, "scale": 1.0, "original_max_position": None, "beta_fast": 32.0, "beta_slow": 1.0}

    def compute_inv_freq(self):
        if self.options["original_max_position"] is None:
            self.options["original_max_position"] = self.block_size
        original = self.number("original_max_position", minimum=1)
        beta_slow = self.number("beta_slow", above=0.0)
        beta_fast = self.number("beta_fast", above=beta_slow)
        scale = self.number("scale", minimum=1.0)
        return yarn_inv_freq(self.head_dim, self.theta, scale, int(original), beta_fast, beta_slow)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.attention_factor = yarn_attention_factor(self.number("scale"))
