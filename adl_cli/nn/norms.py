"""Normalisation layers by name (``model.norm``).

    layernorm   y = (x - mean(x)) / sqrt(var(x) + eps) * g + b      Ba, Kiros & Hinton (2016)
    rmsnorm     y = x / sqrt(mean(x^2) + eps) * g                   Zhang & Sennrich (2019)

RMSNorm drops the centring and the bias: fewer operations for the same quality in LLaMA-style
models. Both act over the last dimension.
"""

from __future__ import annotations

from torch import nn

from adl_cli.registry import Registry

NORMS = Registry("norm")


@NORMS.register("layernorm")
def layernorm(dim: int, *, bias: bool = True, eps: float = 1e-5) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, bias=bias)


@NORMS.register("rmsnorm")
def rmsnorm(dim: int, *, bias: bool = True, eps: float = 1e-6) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps)  # no bias by definition
