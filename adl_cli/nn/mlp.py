"""Feed-forward blocks by name (``model.mlp``); ``hidden`` is the inner width.

    gelu     W2 GELU_tanh(W1 x)                     GPT-2 (Radford et al. 2019), 4C wide
    relu2    W2 ReLU(W1 x)^2                        Primer (So et al. 2021); modded-nanogpt
    swiglu   W2 (SiLU(W1 x) * W3 x)                 Shazeer, "GLU Variants Improve Transformer" (2020)

SwiGLU has three matrices; at the same parameter count as a 4C-wide MLP its inner width is
8C/3 (LLaMA's choice), which ``default_hidden`` rounds up to a multiple of 64. The output
projection is named ``c_proj`` in every variant (the model scales or zeroes its initialisation).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from adl_cli.registry import Registry

MLPS = Registry("mlp")


def default_hidden(kind: str, n_embd: int) -> int:
    if kind == "swiglu":
        return 64 * math.ceil(8 * n_embd / 3 / 64)
    return 4 * n_embd


class TwoLayerMLP(nn.Module):
    """W2 act(W1 x); subclasses give the activation."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def activation(self, h):
        raise NotImplementedError

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)))


@MLPS.register("gelu")
class GeluMLP(TwoLayerMLP):
    def activation(self, h):
        return F.gelu(h, approximate="tanh")


@MLPS.register("relu2")
class ReluSquaredMLP(TwoLayerMLP):
    def activation(self, h):
        return F.relu(h).square()


@MLPS.register("swiglu")
class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool = True):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.up_proj = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
