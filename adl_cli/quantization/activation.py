"""Activation-aware quantization: methods that look at what flows into a linear layer.

A per-input-channel factor s moves difficulty between activations and weights without changing the
layer: y = x W^T = (x / s)(W diag(s))^T (the division is folded into the operation before the
layer). The methods differ in what they do with it:

    SmoothQuant (Xiao et al. 2023), W8A8: s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha) flattens the
        activations' outlier channels so both sides round to int8 well (weights per output
        channel, activations per token, dynamically).
    AWQ (Lin et al. 2024), weight-only: s_j = mean|X_j|^alpha scales up the weights of the inputs
        that matter most before rounding; alpha in [0, 1] is searched on calibration rows for the
        smallest output error (alpha = 0 is round-to-nearest, so the search never does worse on
        its calibration data); then each (row, group)'s range is clipped by the ratio in
        [0.5, 1] that gives that group's smallest output error (AWQ's clipping search; ratio 1
        is again round-to-nearest).
    LLM.int8() (Dettmers et al. 2022): no scaling; the input channels where any activation reaches
        ``threshold`` are multiplied in floating point, the rest in int8 with one scale per token
        (rows of x) and per output channel (rows of W).
"""

from __future__ import annotations

import torch

from adl_cli.quantization.grids import asymmetric, symmetric


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, scales): each row of ``x`` rounded on its own absmax int8 grid."""
    q = symmetric(x, 8, 0)
    return q.q, q.scale[:, 0]


def w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with both sides rounded to int8 (activations per token, weights per output channel),
    the integer product accumulated exactly and scaled back."""
    qx, sx = int8_rows(x)
    qw, sw = int8_rows(w)
    acc = qx.double() @ qw.double().T  # exact: integer sums far below 2^53
    return (acc * sx.double()[:, None] * sw.double()[None, :]).to(x.dtype)


def smoothquant_scales(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha) per input channel j (1 where either is 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    wmax = w.abs().amax(0).float()
    s = x_absmax.float().clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return torch.where((x_absmax > 0) & (wmax > 0), s, torch.ones_like(s))


def smoothquant_w8a8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8 after smoothing: (x / s) and (W diag(s)) each rounded to int8."""
    return w8a8(x / scales, w * scales)


def llm_int8(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8()'s mixed-precision product: outlier input channels (any |x| >= threshold) in
    floating point, the others through w8a8."""
    outliers = (x.abs() >= threshold).any(0)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    if (~outliers).any():
        y += w8a8(x[:, ~outliers], w[:, ~outliers])
    if outliers.any():
        y += x[:, outliers] @ w[:, outliers].T
    return y


def awq_candidates(x: torch.Tensor, w: torch.Tensor, *, group_size: int = 128, grid: int = 20):
    """AWQ's candidate input scales for weight ``w`` (out, in) fed by rows ``x``: (alpha, s) over an
    even grid of alpha in [0, 1], in two families, each s normalised so that max s x min s = 1:

        s = mean|X_j|^alpha                                  (AWQ's paper)
        s = mean|X_j|^alpha / mean|W_:j / max_group|W||^(1 - alpha)   (AutoAWQ's duo scaling)

    alpha = 0 of the first is s = 1, round-to-nearest."""
    mean_abs = x.abs().float().mean(0).clamp_min(1e-8)
    width = w.shape[1]
    g = group_size or width
    wg = w.float().abs().reshape(w.shape[0], width // g, g)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp_min(1e-6)).reshape(w.shape).mean(0)
    for duo in (False, True):
        for k in range(grid + 1):
            alpha = k / grid
            s = mean_abs ** alpha / (w_mean ** (1 - alpha) + 1e-4) if duo else mean_abs ** alpha
            s = s.clamp_min(1e-4)
            yield alpha, s / (s.max() * s.min()).sqrt()


class BlockProbe:
    """The output of ``scope`` (a module inside a block) on its recorded ``inputs`` (args, kwargs), with
    the weights of some of its ``layers`` replaced: the squared error against the float output."""

    def __init__(self, scope: torch.nn.Module, layers: list[torch.nn.Linear], inputs: list[tuple[tuple, dict]]):
        self.scope, self.layers, self.inputs = scope, layers, inputs
        with torch.no_grad():
            self.ref = [scope(*a, **k).float() for a, k in inputs]

    @torch.no_grad()
    def error(self, weights: list[torch.Tensor]) -> float:
        """The squared error of the output with layer i computing x weights[i]^T (+ its bias)."""
        originals = [lin.weight.data for lin in self.layers]
        try:
            for lin, w, o in zip(self.layers, weights, originals):
                lin.weight.data = w.to(o.dtype).to(o.device)
            return sum(float((self.scope(*a, **k).float() - r).pow(2).sum()) for (a, k), r in zip(self.inputs, self.ref))
        finally:
            for lin, o in zip(self.layers, originals):
                lin.weight.data = o


def awq_block_scales(probe: BlockProbe, x: torch.Tensor, *, bits: int = 4, group_size: int = 128, grid: int = 20) -> tuple[torch.Tensor, float]:
    """(s, alpha): AutoAWQ's block objective. The probe's layers share one input (rows ``x``) inside
    its module (q, k and v in an attention block; fc1 in an MLP); one scale s for all of them is
    chosen among ``awq_candidates`` (of their weights stacked) for the smallest error of the
    module's output with every layer's weight replaced by Q(W diag(s)) diag(s)^-1, the function the
    quantized layer computes on x. The error passes through what follows the layers in the block
    (softmax, the activation, the output projection), which the per-layer objective of
    ``awq_scales`` does not see."""
    weights = [lin.weight.detach().float().cpu() for lin in probe.layers]
    best = (float("inf"), torch.ones(weights[0].shape[1]), 0.0)
    for alpha, s in awq_candidates(x, torch.cat(weights), group_size=group_size, grid=grid):
        err = probe.error([asymmetric(w * s, bits, group_size).dequantize() / s for w in weights])
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def awq_scales(x: torch.Tensor, w: torch.Tensor, *, bits: int = 4, group_size: int = 128, grid: int = 20) -> tuple[torch.Tensor, float]:
    """(s, alpha): the candidate of ``awq_candidates`` whose weight-only rounding of W diag(s) gives
    the smallest ||x W^T - (x / s) Q(W diag(s))^T||^2 on the calibration rows ``x`` (the per-layer
    objective; s = 1, round-to-nearest, is a candidate, so it never does worse on its rows)."""
    ref = x.float() @ w.float().T
    best = (float("inf"), torch.ones(w.shape[1]), 0.0)
    for alpha, s in awq_candidates(x, w, group_size=group_size, grid=grid):
        deq = asymmetric(w.float() * s, bits, group_size).dequantize()
        err = float(((x.float() / s) @ deq.T - ref).pow(2).sum())
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def awq_clip(x: torch.Tensor, w: torch.Tensor, *, bits: int = 4, group_size: int = 128, grid: int = 20, rows: int = 512) -> torch.Tensor:
    """The clipping ratio per (output row, group) of ``w`` (out, in) minimising the mean over
    calibration rows ``x`` (n, in) of (x_g . (w_g - Q_r(w_g)))^2, the group's share of the output
    error, r over an even grid on [0.5, 1]."""
    out, width = w.shape
    g = group_size or width
    xs = x[:rows].float().reshape(-1, width // g, g)  # (n, groups, g)
    wg = w.float().reshape(out, width // g, g)  # (out, groups, g)
    best = torch.full((out, width // g), float("inf"))
    ratio = torch.ones(out, width // g)
    for k in range(grid // 2 + 1):
        r = 1.0 - k / grid
        deq = asymmetric(w.float(), bits, group_size, clip=r).dequantize().reshape(out, width // g, g)
        err = torch.einsum("ngi,ogi->nog", xs, wg - deq).pow(2).mean(0)  # (out, groups)
        better = err < best
        best = torch.where(better, err, best)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    return ratio
