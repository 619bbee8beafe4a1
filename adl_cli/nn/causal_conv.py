"""The short causal depthwise convolution over time that Mamba, Mamba-2 and the mLSTM block put
before their recurrence: y_t = b + sum_i w_i * x_{t-k+1+i}, per channel, over (B, L, C) inputs.

Computed as k shifted multiply-adds on the (B, L, C) layout (no transposes; on a CPU several times
faster than nn.Conv1d's depthwise kernel, forward and backward). The parameters keep
nn.Conv1d's depthwise layout and initialisation (weight (C, 1, k), bias (C)), so a checkpoint
from a Conv1d loads. ``state``: the last k - 1 inputs (B, k - 1, C) of what came before (a
decode step continues from it); the new state comes back with the output.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalConv(nn.Module):
    def __init__(self, channels: int, taps: int):
        super().__init__()
        init = nn.Conv1d(channels, channels, taps, groups=channels)  # torch's default initialisation
        self.weight, self.bias = init.weight, init.bias
        self.taps = taps

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, c = x.shape
        past = x.new_zeros(b, self.taps - 1, c) if state is None else state.to(x.dtype)
        xp = torch.cat([past, x], 1)  # (B, k - 1 + L, C)
        w = self.weight[:, 0].t()  # (k, C)
        y = self.bias.expand(b, length, c)
        for i in range(self.taps):
            y = torch.addcmul(y, xp[:, i:i + length], w[i])
        return y, xp[:, length:]
