"""Number grids for weights, per output row and per group of ``group_size`` inputs (the whole row
when ``group_size`` is 0). Each returns the grid's parameters; ``dequantize`` gives back the
floats the integers stand for.

    symmetric (absmax):   s = max |w| / q_max,        q = round(w / s) in [-q_max, q_max],  w' = q s
    asymmetric:           s = (max w - min w) / (2^b - 1),  z = round(-min w / s),
                          q = clamp(round(w / s) + z, 0, 2^b - 1),  w' = (q - z) s
    NF4 (Dettmers et al. 2023): 16 values, the normal distribution's quantiles scaled to [-1, 1]
                          with an exact 0 (8 positive, 7 negative), w' = c[q] x absmax of the block
    HQQ (Badri and Shaji 2023): the asymmetric grid with its zero points refit, without data, to
                          the smallest l_p rounding error (p < 1)

Rounding to nearest moves a weight by at most half a step: |w - w'| <= s / 2 on the linear grids
(the tests check this bound); the NF4 step varies along the codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` (out, in) as (out, in / group_size, group_size)."""
    out, width = w.shape
    g = group_size or width
    if g <= 0 or width % g:
        raise ValueError(f"the group size {group_size} does not divide the input width {width}")
    return w.reshape(out, width // g, g)


@dataclass
class Quantized:
    """Integers (out, in) and the grid they index: ``scale`` and ``zero`` per (row, group); for a
    codebook grid ``codebook`` (its values, times the scale)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    bits: int
    codebook: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        out, width = self.q.shape
        g = self.group_size or width
        q = self.q.reshape(out, width // g, g)
        if self.codebook is not None:
            vals = self.codebook.to(self.scale.dtype)[q.long()]
        else:
            vals = q.to(self.scale.dtype) - (0 if self.zero is None else self.zero[..., None])
        return (vals * self.scale[..., None]).reshape(out, width)


def symmetric(w: torch.Tensor, bits: int = 8, group_size: int = 0) -> Quantized:
    """Absmax rounding to 2^(b-1) - 1 levels each side of 0 (int8: per channel with group_size 0)."""
    qmax = 2 ** (bits - 1) - 1
    g = _groups(w.float(), group_size)
    scale = (g.abs().amax(-1) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(g / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
    return Quantized(q.reshape(w.shape), scale, None, group_size, bits)


def asymmetric_params(g: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the min-max grid of each row of ``g`` (..., n): 2^b levels spanning
    [min(min g, 0), max(max g, 0)], so 0 is always on the grid; ``clip`` (a ratio per row, or one)
    shrinks that range (the weights beyond it round to its ends)."""
    maxq = 2 ** bits - 1
    lo, hi = g.amin(-1).clamp_max(0.0) * clip, g.amax(-1).clamp_min(0.0) * clip
    scale = ((hi - lo) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale)
    return scale, zero


def round_to(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers in 0..2^b - 1 nearest to x / scale + zero."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)


def asymmetric(w: torch.Tensor, bits: int = 4, group_size: int = 128, clip: torch.Tensor | float = 1.0) -> Quantized:
    """Min-max rounding with a zero point per (row, group): b-bit unsigned integers; ``clip``: a
    ratio per (row, group) (or one) that shrinks each range."""
    g = _groups(w.float(), group_size)
    scale, zero = asymmetric_params(g, bits, clip)
    q = round_to(g, scale[..., None], zero[..., None], bits).to(torch.uint8)
    return Quantized(q.reshape(w.shape), scale, zero, group_size, bits)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1) at evenly spaced probabilities from 1 - delta down to
    1/2 for the 8 positive values and the 7 negative ones, delta = (1/(2 x 15) + 1/(2 x 16)) / 2 (the
    middle of the two quantile grids' end points), an exact 0 between, all divided by the largest."""
    delta = 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def nf4(w: torch.Tensor, group_size: int = 64) -> Quantized:
    """Each block of ``group_size`` weights scaled by its absmax to [-1, 1] and rounded to the
    nearest NF4 value (bitsandbytes' blockwise NF4, before its packing)."""
    code = nf4_codebook()
    g = _groups(w.float(), group_size)
    scale = g.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    x = (g / scale[..., None]).unsqueeze(-1)
    q = (x - code).abs().argmin(-1).to(torch.uint8)
    return Quantized(q.reshape(w.shape), scale, None, group_size, 4, code)


def hqq(w: torch.Tensor, bits: int = 4, group_size: int = 64, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        iterations: int = 20) -> Quantized:
    """Calibration-free zero points (HQQ, Badri and Shaji 2023): starting from the min-max grid,
    the zero point of each (row, group) is refit to minimise the l_p norm (p < 1: a few large
    errors cost less than many small ones) of the rounding error, by half-quadratic splitting:

        W_e  = shrink_p(W - (Q - z) s)              (the error, shrunk toward 0: |x| > |x|^(p-1) / beta kept)
        z    = mean over the group of (Q - (W - W_e) / s),   Q = round(W / s + z),   beta *= kappa

    The scale stays the min-max one; the iterate with the smallest l_p error is kept."""
    g = _groups(w.float(), group_size)
    scale, zero = asymmetric_params(g, bits)
    s, z = scale[..., None], zero[..., None].clone()
    maxq = 2 ** bits - 1

    def lp(zz):
        q = torch.clamp(torch.round(g / s + zz), 0, maxq)
        return ((g - (q - zz) * s).abs() ** p).sum(-1, keepdim=True), q

    best_err, _ = lp(z)
    best_z = z.clone()
    for _ in range(iterations):
        q = torch.clamp(torch.round(g / s + z), 0, maxq)
        e = g - (q - z) * s
        shrunk = torch.sign(e) * torch.relu(e.abs() - e.abs().clamp_min(1e-12) ** (p - 1) / beta)
        z = (q - (g - shrunk) / s).mean(-1, keepdim=True)
        beta *= kappa
        err, _ = lp(z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, z, best_z)
    q = torch.clamp(torch.round(g / s + best_z), 0, maxq).to(torch.uint8)
    return Quantized(q.reshape(w.shape), scale, best_z[..., 0], group_size, bits)
