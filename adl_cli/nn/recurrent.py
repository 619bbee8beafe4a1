"""Recurrent cells written out (the teaching version), with torch's parameter layout so that the
fast version (``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``, cuDNN on a GPU) is the same function of the
same weights (tests copy one into the other).

    rnn   h' = tanh(W_ih x + b_ih + W_hh h + b_hh)                         (Elman 1990)
    gru   r = sigma(.. r rows ..), z = sigma(.. z rows ..)                  (Cho et al. 2014)
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) n + z h
    lstm  i, f, g, o from one matmul each side (rows in that order)         (Hochreiter and
          c' = f c + i g,  h' = o tanh(c')                                   Schmidhuber 1997)

``weight_ih`` (G H, I), ``weight_hh`` (G H, H), ``bias_ih``, ``bias_hh`` (G H,), G = 1, 3, 4: the
rows of the gates stacked in torch's order. The state is h (B, H), or (h, c) for the LSTM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


class RecurrentCell(nn.Module):
    def __init__(self, kind: str, input_size: int, hidden_size: int):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"a recurrent cell is one of {', '.join(GATES)}, got '{kind}'")
        self.kind, self.hidden_size = kind, hidden_size
        g = GATES[kind]
        self.weight_ih = nn.Parameter(torch.empty(g * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(g * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(g * hidden_size))
        bound = 1 / math.sqrt(hidden_size)  # torch's initialisation: U(-1/sqrt(H), 1/sqrt(H)) everywhere
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def initial_state(self, batch: int, device=None, dtype=None):
        h = torch.zeros(batch, self.hidden_size, device=device, dtype=dtype or self.weight_ih.dtype)
        return (h, torch.zeros_like(h)) if self.kind == "lstm" else h

    def step(self, x_proj: torch.Tensor, state):
        """One time step from the input's projection W_ih x + b_ih (B, G H) and the state."""
        h = state[0] if self.kind == "lstm" else state
        hh = h @ self.weight_hh.T + self.bias_hh
        if self.kind == "rnn":
            return torch.tanh(x_proj + hh)
        if self.kind == "gru":
            xr, xz, xn = x_proj.chunk(3, -1)
            hr, hz, hn = hh.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h
        i, f, g, o = (x_proj + hh).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: torch.Tensor, state=None):
        """x (B, L, I) -> (outputs h_1..h_L (B, L, H), the last state)."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        proj = x @ self.weight_ih.T + self.bias_ih  # every step's input side in one matmul
        out = []
        for t in range(x.shape[1]):
            state = self.step(proj[:, t], state)
            out.append(state[0] if self.kind == "lstm" else state)
        return torch.stack(out, dim=1), state


TORCH_LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def torch_layer(kind: str, input_size: int, hidden_size: int) -> nn.Module:
    """The fast version: torch's fused one-layer, batch-first module with the same parameters."""
    return TORCH_LAYERS[kind](input_size, hidden_size, batch_first=True)


def copy_to_torch(cell: RecurrentCell, layer: nn.Module) -> None:
    """Copy a cell's weights into torch's layer (names ``weight_ih_l0`` ...)."""
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").copy_(getattr(cell, name))
