"""Mamba-2 (Dao and Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality") as a language-model family.

The block is Mamba's (x + mixer(RMSNorm(x)), models/mamba.py) with the Mamba-2 mixer: one input
projection gives the gate z (E), the SSM input x (E), B and C (N each, shared by all heads) and
one step per head; x, B and C pass a causal depthwise convolution and SiLU together; the SSM is
the SSD (nn/ssd.py): per head a scalar decay A_h times the identity, E / headdim heads of
(headdim x N) states; a learned skip D per head; the output is normalised after the gate
(RMSNorm(y * SiLU(z))) and projected back to n_embd. A_h = -exp(A_log) with A_log from
log U[1, 16]; steps from softplus(dt + dt_bias), dt_bias set so that they start in [1e-3, 0.1].

Decodes from a constant-size state (the convolution's last inputs and (heads, headdim, N) per
layer) through the engine, with the same exact left padding as Mamba (a zero step passes the
state unchanged). ``ssd`` picks the form: chunked (the fast one), quadratic, recurrent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.models.lm import LMConfig
from adl_cli.models.mamba import Mamba, RMSNorm
from adl_cli.nn.causal_conv import CausalConv
from adl_cli.nn.fp32 import in_float32
from adl_cli.nn.ssd import SSD_FORMS, ssd


@dataclass
class Mamba2Config(LMConfig, ModelConfig):
    family: str = "mamba2"
    n_layer: int = 4
    n_embd: int = 128
    d_state: int = 32  # N
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16  # P: heads = expand * n_embd / headdim
    block_size: int = 256  # the training length (and the decode window the engine slides)
    ssd: str = "chunked"  # chunked | quadratic | recurrent
    ssd_chunk: int = 32
    vocab_multiple: int = 64
    vocab_size: int = 0
    attention = "none (SSD)"  # (pretrain's log line)
    recurrent = True

    def validate(self) -> None:
        self.require_positive("n_layer", "n_embd", "d_state", "d_conv", "expand", "headdim", "block_size", "ssd_chunk", "vocab_multiple")
        if self.vocab_size < 0:
            raise ValueError("model.vocab_size must be >= 0 (0: from the tokenizer)")
        if self.inner % self.headdim:
            raise ValueError(f"model.headdim ({self.headdim}) must divide expand x n_embd ({self.inner})")
        if self.ssd not in SSD_FORMS:
            raise ValueError(f"model.ssd must be one of {', '.join(SSD_FORMS)}, got '{self.ssd}'")

    @property
    def inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def n_heads(self) -> int:
        return self.inner // self.headdim

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.d_conv - 1, self.inner + 2 * self.d_state), (self.n_heads, self.headdim, self.d_state)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        e, n, h = cfg.inner, cfg.d_state, cfg.n_heads
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.n_embd, 2 * e + 2 * n + h, bias=False)
        self.conv = CausalConv(e + 2 * n, cfg.d_conv)
        dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = RMSNorm(e)
        self.out_proj = nn.Linear(e, cfg.n_embd, bias=False)

    def forward(self, u: torch.Tensor, keep: torch.Tensor | None = None, state=None):
        cfg = self.cfg
        b, length, _ = u.shape
        e, n, h, p = cfg.inner, cfg.d_state, cfg.n_heads, cfg.headdim
        z, xbc, dt = self.in_proj(u).split([e, e + 2 * n, h], dim=-1)
        if keep is not None:
            xbc = xbc * keep[..., None]
        conv, last_inputs = self.conv(xbc, None if state is None else state[0])
        x, B, C = F.silu(conv).split([e, n, n], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        if keep is not None:
            dt = dt * keep[..., None]
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, length, h, p)
        form = "recurrent" if state is not None and length == 1 else cfg.ssd
        y, last = in_float32(ssd, x, dt, A, B, C, None if state is None else state[1], form=form, chunk=cfg.ssd_chunk)
        y = (y + x * self.D[:, None]).reshape(b, length, e)
        if state is not None:
            state[0], state[1] = last_inputs, last
        return self.out_proj(self.norm(y * F.silu(z)))


class Mamba2(Mamba):
    mixer = Mamba2Mixer

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x the weights' multiply-adds (head tied) + the SSD's work per token, chunked: about
        2 Q (N + P) per head inside a chunk and 4 P N per head for the states, times 3 (forward
        and backward)."""
        cfg = self.config
        e, n, h, p, q = cfg.inner, cfg.d_state, cfg.n_heads, cfg.headdim, cfg.ssd_chunk
        per_layer = cfg.n_embd * (2 * e + 2 * n + h) + e * cfg.n_embd
        ssd_work = h * (2 * q * (n + p) + 4 * p * n) + 2 * (e + 2 * n) * cfg.d_conv
        return 6 * (cfg.n_layer * per_layer + cfg.n_embd * cfg.vocab_size) + 3 * cfg.n_layer * ssd_work


FAMILIES.register("mamba2")(Family(Mamba2Config, build=Mamba2))
