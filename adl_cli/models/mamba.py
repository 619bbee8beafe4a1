"""Mamba (Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") as
a language-model family.

A block is x + mixer(RMSNorm(x)); the mixer projects the input to two branches of width E
(``expand`` x n_embd): the first passes a causal depthwise convolution (``d_conv`` taps) and SiLU,
then the selective SSM whose step Delta (softplus of a rank-R projection), input map B and output
map C are functions of the token (nn/scan.py); the second, SiLU(z), gates its output; a linear
map returns to n_embd. A = -exp(A_log) (A_log starts at log 1..N per channel, S4D-real), D a
learned skip. Embeddings tied to the head.

Decoding carries a constant-size state per layer instead of a key/value cache: the last
d_conv - 1 inputs of the convolution and the SSM state (E x N); ``MambaState`` speaks the
engine's decode-state protocol. Left padding is exact: a padded position's input and step are
zeroed, so the state passes it unchanged (a = exp(0) = 1, b = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.models.lm import LMConfig, TiedLM
from adl_cli.nn.causal_conv import CausalConv
from adl_cli.nn.fp32 import in_float32
from adl_cli.nn.scan import SCANS, selective_scan


@dataclass
class MambaConfig(LMConfig, ModelConfig):
    family: str = "mamba"
    n_layer: int = 4
    n_embd: int = 128
    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(n_embd / 16)
    block_size: int = 256  # the training length (and the decode window the engine slides)
    scan: str = "chunked"  # chunked (fused, the fast one) | parallel (doubling) | sequential (the loop)
    scan_chunk: int = 16
    vocab_multiple: int = 64
    vocab_size: int = 0
    attention = "none (selective SSM)"  # (pretrain's log line)
    recurrent = True

    def validate(self) -> None:
        self.require_positive("n_layer", "n_embd", "d_state", "d_conv", "expand", "block_size", "scan_chunk", "vocab_multiple")
        if self.dt_rank < 0 or self.vocab_size < 0:
            raise ValueError("model.dt_rank and model.vocab_size must be >= 0 (0: derived)")
        if self.scan not in SCANS:
            raise ValueError(f"model.scan must be one of {', '.join(SCANS)}, got '{self.scan}'")

    @property
    def inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.n_embd / 16)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A layer's decode state per sequence: the convolution's last inputs, the SSM state."""
        return (self.d_conv - 1, self.inner), (self.inner, self.d_state)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        e, n, r = cfg.inner, cfg.d_state, cfg.rank
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.n_embd, 2 * e, bias=False)
        self.conv = CausalConv(e, cfg.d_conv)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e)
        dt = torch.exp(torch.rand(e) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))  # steps in [1e-3, 0.1]
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, cfg.n_embd, bias=False)

    def _ssm_inputs(self, x: torch.Tensor):
        r, n = self.cfg.rank, self.cfg.d_state
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, u: torch.Tensor, keep: torch.Tensor | None = None, state=None):
        """u (B, L, C) -> (B, L, C). ``keep`` (B, L) bool: False at left padding. ``state``: a layer's
        (conv inputs (B, d_conv - 1, E), ssm state (B, E, N)) to continue from and to update."""
        b, length, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)
        if keep is not None:
            x = x * keep[..., None]
        conv, last_inputs = self.conv(x, None if state is None else state[0])
        x = F.silu(conv)
        delta, B, C = self._ssm_inputs(x)
        if keep is not None:
            delta = delta * keep[..., None]
        A = -torch.exp(self.A_log.float())
        method = "sequential" if state is not None and length == 1 else self.cfg.scan
        y, h = in_float32(selective_scan, x, delta, A, B, C, self.D, None if state is None else state[1], method=method, chunk=self.cfg.scan_chunk)
        if state is not None:
            state[0], state[1] = last_inputs, h
        return self.out_proj(y * F.silu(z))


class Block(nn.Module):
    def __init__(self, cfg, mixer: type[nn.Module]):
        super().__init__()
        self.norm, self.mixer = RMSNorm(cfg.n_embd), mixer(cfg)

    def forward(self, x, keep=None, state=None):
        return x + self.mixer(self.norm(x), keep, state)


class MambaState:
    """The decode state: per layer [conv inputs (B, d_conv - 1, channels), SSM state (B, ...)], the
    shapes from the config's ``state_shapes`` (Mamba and Mamba-2)."""

    can_be_static = False
    can_truncate = False  # a recurrent state cannot go back (speculative decoding refuses it)

    def __init__(self, cfg: MambaConfig, batch: int, max_len: int, device, dtype):
        self.cfg, self.batch, self.max_len, self.device, self.dtype = cfg, batch, max_len, device, dtype
        self.reset()

    def reset(self) -> None:
        self.layers = [[torch.zeros(self.batch, *shape, device=self.device, dtype=self.dtype) for shape in self.cfg.state_shapes()]
                       for _ in range(self.cfg.n_layer)]
        self.length, self.pad = 0, None

    def reorder(self, index: torch.Tensor) -> None:
        self.layers = [[t.index_select(0, index) for t in layer] for layer in self.layers]
        self.batch = len(index)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


class Mamba(TiedLM):
    mixer: type[nn.Module] = Mixer  # Mamba-2 (models/mamba2.py) swaps in its own

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tie(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, self.mixer) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.mixer.out_proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def hidden(self, idx: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        return self.through_blocks(idx, state)

    def setup_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> MambaState:
        return MambaState(self.config, batch, max_len or self.config.block_size, device or self.wte.weight.device,
                          dtype or self.wte.weight.dtype)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 x the weights' multiply-adds (the head tied, counted once)
        + the scan's and the convolution's elementwise work (about 6 E N + 2 E d_conv forward)."""
        cfg = self.config
        e, n = cfg.inner, cfg.d_state
        per_layer = cfg.n_embd * 2 * e + e * (cfg.rank + 2 * n) + cfg.rank * e + e * cfg.n_embd
        return 6 * (cfg.n_layer * per_layer + cfg.n_embd * cfg.vocab_size) + 3 * cfg.n_layer * (6 * e * n + 2 * e * cfg.d_conv)


FAMILIES.register("mamba")(Family(MambaConfig, build=Mamba))
