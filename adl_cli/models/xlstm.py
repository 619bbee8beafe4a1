"""xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory") as two language-model
families: ``mlstm`` (every block an mLSTM block) and ``slstm`` (every block an sLSTM block).

mLSTM block (the paper's pre-up-projection block): LayerNorm, up-projection to two branches of
width E (``expand`` x n_embd); the first passes a causal depthwise convolution and SiLU and gives
the queries and keys, the values come from before the convolution; the input and forget gates
(one per head) from the convolved branch; the matrix-memory cell (nn/mlstm.py: chunkwise for
training, recurrent for decoding); a per-head RMS norm, plus a learned skip of the convolved
branch, gated by SiLU of the second branch; down-projection; residual. (The paper's q, k, v
projections are block-diagonal; here they are full linear maps.)

sLSTM block (post-up-projection): LayerNorm, the sLSTM cell with ``n_head`` heads (block-diagonal
recurrent weights: a head sees only its own previous output), a per-head RMS norm, residual; then
LayerNorm and a SwiGLU feed-forward of 4/3 the width, residual. The cell, per unit:

    z = tanh(z~), i = exp(i~), f = sigmoid(f~), o = sigmoid(o~)  (z~ .. o~ = W x_t + R h_{t-1} + b)
    c_t = f c_{t-1} + i z,  n_t = f n_{t-1} + i,  h_t = o c_t / n_t

run with the stabiliser m_t = max(log f + m_{t-1}, i~), i' = exp(i~ - m_t), f' = exp(log f +
m_{t-1} - m_t), which leaves h unchanged (``stabilise=False``: the raw gates, to check that).
The written-out loop over time is the only form an sLSTM has: its gates read h_{t-1}.

Both decode from a constant-size state through the engine; left padding is exact (a padded
position shuts the input gate and opens the forget gate, so the state passes it unchanged).
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
from adl_cli.nn.mlstm import MLSTM_FORMS, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent


@dataclass
class XLSTMConfig(LMConfig, ModelConfig):
    family: str = "mlstm"  # mlstm | slstm
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    expand: int = 2  # the mLSTM block's up-projection
    d_conv: int = 4
    form: str = "chunkwise"  # mLSTM training form: chunkwise | parallel | recurrent
    chunk: int = 32
    stabilise: bool = True  # sLSTM: False runs the raw exponential gates (for checks only)
    block_size: int = 256  # the training length (and the decode window the engine slides)
    vocab_multiple: int = 64
    vocab_size: int = 0
    attention = "none (xLSTM)"  # (pretrain's log line)
    recurrent = True

    def validate(self) -> None:
        if self.family not in ("mlstm", "slstm"):
            raise ValueError(f"an xLSTM's family is mlstm or slstm, got '{self.family}'")
        self.require_positive("n_layer", "n_embd", "n_head", "expand", "d_conv", "chunk", "block_size", "vocab_multiple")
        if self.vocab_size < 0:
            raise ValueError("model.vocab_size must be >= 0 (0: from the tokenizer)")
        width = self.inner if self.family == "mlstm" else self.n_embd
        if width % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide the cell's width ({width})")
        if self.form not in MLSTM_FORMS:
            raise ValueError(f"model.form must be one of {', '.join(MLSTM_FORMS)}, got '{self.form}'")

    @property
    def inner(self) -> int:
        return self.expand * self.n_embd


def _head_rms(x: torch.Tensor, heads: int, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMS norm within each head's slice of the last dimension (the paper's group norm)."""
    shape = x.shape
    x = x.reshape(*shape[:-1], heads, shape[-1] // heads)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape) * weight


class MLSTMBlock(nn.Module):
    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        e, h = cfg.inner, cfg.n_head
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.n_embd, bias=False)
        self.up = nn.Linear(cfg.n_embd, 2 * e, bias=False)
        self.conv = CausalConv(e, cfg.d_conv)
        self.q, self.k, self.v = (nn.Linear(e, e, bias=False) for _ in range(3))
        self.gates = nn.Linear(e, 2 * h)
        with torch.no_grad():  # forget gates start open (bias 3..6), input gates small
            self.gates.weight.zero_()
            self.gates.bias[:h].normal_(0.0, 0.1)
            self.gates.bias[h:].copy_(torch.linspace(3.0, 6.0, h))
        self.out_norm = nn.Parameter(torch.ones(e))
        self.skip = nn.Parameter(torch.ones(e))
        self.down = nn.Linear(e, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, state=None):
        cfg = self.cfg
        b, length, _ = x.shape
        e, h = cfg.inner, cfg.n_head
        d = e // h
        xm, z = self.up(self.norm(x)).chunk(2, dim=-1)
        if keep is not None:
            xm = xm * keep[..., None]
        conv, last_inputs = self.conv(xm, None if state is None else state[0])
        xc = F.silu(conv)

        def heads(t):
            return t.reshape(b, length, h, d).transpose(1, 2)

        q, k, v = heads(self.q(xc)), heads(self.k(xc)) / math.sqrt(d), heads(self.v(xm))
        i_pre, f_pre = self.gates(xc).transpose(1, 2).chunk(2, dim=1)  # (b, h, l) each
        if keep is not None:  # a padded position: input gate shut, forget gate open
            shut = ~keep[:, None, :]
            i_pre = i_pre.masked_fill(shut, float("-inf"))
            f_pre = f_pre.masked_fill(shut, float("inf"))
        if state is not None:
            y, state[1] = (in_float32(mlstm_recurrent, q, k, v, i_pre, f_pre, state[1]) if length == 1
                           else in_float32(mlstm_chunkwise, q, k, v, i_pre, f_pre, state[1], cfg.chunk))
            state[0] = last_inputs
        elif cfg.form == "parallel":
            y = in_float32(mlstm_parallel, q, k, v, i_pre, f_pre)
        elif cfg.form == "recurrent":
            y = in_float32(mlstm_recurrent, q, k, v, i_pre, f_pre)[0]
        else:
            y = in_float32(mlstm_chunkwise, q, k, v, i_pre, f_pre, chunk=cfg.chunk)[0]
        y = _head_rms(y.transpose(1, 2).reshape(b, length, e), h, self.out_norm) + self.skip * xc
        return x + self.down(y * F.silu(z))


def slstm_scan(pre: torch.Tensor, R: torch.Tensor, state, keep: torch.Tensor | None = None, stabilise: bool = True):
    """The sLSTM cell over time. pre (b, l, 4, H, d): W x_t + b for z, i, f, o; R (4, H, d, d)
    the block-diagonal recurrent weights; state (c, n, m, h), each (b, H, d). Returns the
    outputs (b, l, H, d) and the new state."""
    c, n, m, hid = state
    out = []
    for t in range(pre.shape[1]):
        g = pre[:, t] + torch.einsum("bhd,ghde->bghe", hid, R)
        z, o = torch.tanh(g[:, 0]), torch.sigmoid(g[:, 3])
        i_pre, log_f = g[:, 1], F.logsigmoid(g[:, 2])
        if stabilise:
            m_new = torch.maximum(log_f + m, i_pre)
            i, f = torch.exp(i_pre - m_new), torch.exp(log_f + m - m_new)
        else:
            m_new, i, f = m, torch.exp(i_pre), torch.exp(log_f)
        c_new, n_new = f * c + i * z, f * n + i
        h_new = o * c_new / n_new
        if keep is not None:  # a padded position leaves every part of the state as it was
            on = keep[:, t, None, None]
            c_new, n_new, m_new, h_new = (torch.where(on, new, old) for new, old in ((c_new, c), (n_new, n), (m_new, m), (h_new, hid)))
        c, n, m, hid = c_new, n_new, m_new, h_new
        out.append(hid)
    return torch.stack(out, 1), (c, n, m, hid)


class SLSTMBlock(nn.Module):
    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        c, h = cfg.n_embd, cfg.n_head
        d = c // h
        self.cfg = cfg
        self.norm = nn.LayerNorm(c, bias=False)
        self.W = nn.Linear(c, 4 * c)
        self.R = nn.Parameter(torch.randn(4, h, d, d) / math.sqrt(d))
        with torch.no_grad():  # forget gates start open
            self.W.bias.view(4, c)[2].copy_(torch.linspace(3.0, 6.0, c))
        self.out_norm = nn.Parameter(torch.ones(c))
        self.ff_norm = nn.LayerNorm(c, bias=False)
        hidden = 64 * math.ceil(4 * c / 3 / 64)
        self.ff_in = nn.Linear(c, 2 * hidden, bias=False)
        self.ff_out = nn.Linear(hidden, c, bias=False)

    def zero_state(self, b: int, device, dtype):
        h, d = self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head
        return tuple(torch.zeros(b, h, d, device=device, dtype=dtype) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, state=None):
        cfg = self.cfg
        b, length, c = x.shape
        h = cfg.n_head
        pre = self.W(self.norm(x)).reshape(b, length, 4, h, c // h)
        start = self.zero_state(b, x.device, x.dtype) if state is None else state[0]
        y, last = in_float32(slstm_scan, pre, self.R, start, keep, cfg.stabilise)
        if state is not None:
            state[0] = last
        x = x + _head_rms(y.reshape(b, length, c), h, self.out_norm)
        gate, up = self.ff_in(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


class XLSTMState:
    """The decode state per layer: mLSTM [conv inputs (b, d_conv - 1, E), (C, n, m)]; sLSTM
    [(c, n, m, h)]. Constant size whatever the length."""

    can_be_static = False
    can_truncate = False  # a recurrent state cannot go back (speculative decoding refuses it)

    def __init__(self, model: "XLSTM", batch: int, max_len: int, device, dtype):
        self.model, self.batch, self.max_len, self.device, self.dtype = model, batch, max_len, device, dtype
        self.reset()

    def reset(self) -> None:
        cfg, b, kw = self.model.config, self.batch, dict(device=self.device, dtype=self.dtype)
        if cfg.family == "mlstm":
            h, d = cfg.n_head, cfg.inner // cfg.n_head
            self.layers = [[torch.zeros(b, cfg.d_conv - 1, cfg.inner, **kw),
                            (torch.zeros(b, h, d, d, **kw), torch.zeros(b, h, d, **kw), torch.zeros(b, h, **kw))] for _ in range(cfg.n_layer)]
        else:
            self.layers = [[block.zero_state(b, self.device, self.dtype)] for block in self.model.blocks]
        self.length, self.pad = 0, None

    def reorder(self, index: torch.Tensor) -> None:
        def pick(t):
            return tuple(pick(u) for u in t) if isinstance(t, tuple) else t.index_select(0, index)

        self.layers = [[pick(t) for t in layer] for layer in self.layers]
        self.batch = len(index)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)

    def nbytes(self) -> int:
        def size(t):
            return sum(size(u) for u in t) if isinstance(t, tuple) else t.numel() * t.element_size()

        return sum(size(t) for layer in self.layers for t in layer)


class XLSTM(TiedLM):
    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tie(cfg.vocab_size, cfg.n_embd)
        block = MLSTMBlock if cfg.family == "mlstm" else SLSTMBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.n_embd, bias=False)
        nn.init.normal_(self.wte.weight, std=0.02)

    def hidden(self, idx: torch.Tensor, state: XLSTMState | None = None) -> torch.Tensor:
        return self.through_blocks(idx, state)

    def setup_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> XLSTMState:
        return XLSTMState(self, batch, max_len or self.config.block_size, device or self.wte.weight.device, dtype or self.wte.weight.dtype)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x the weights' multiply-adds (head tied) + the cells' work: the mLSTM's chunkwise form
        about 4 Q d + 4 d^2 per head per token, the sLSTM's recurrence is in R (a weight)."""
        cfg = self.config
        weights = sum(p.numel() for name, p in self.named_parameters() if p.dim() >= 2 and not name.startswith("wte"))
        cell = 0
        if cfg.family == "mlstm":
            d = cfg.inner // cfg.n_head
            cell = 3 * cfg.n_layer * cfg.n_head * (4 * cfg.chunk * d + 4 * d * d)
        return 6 * (weights + cfg.n_embd * cfg.vocab_size) + cell


FAMILIES.register("mlstm")(Family(XLSTMConfig, build=XLSTM))
FAMILIES.register("slstm")(Family(XLSTMConfig, build=XLSTM))
