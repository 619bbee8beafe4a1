"""Perceiver AR (Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with
Perceiver AR"): a language model whose long context costs one cross-attention.

Of a window of N tokens (``block_size``) only the last M (``latents``) are queries: they are the
latents, started from those tokens' own embeddings. One causal cross-attention lets latent i (at
position N - M + i) read every input at a position <= its own (the mask is nn/attention/mask.py's
end-aligned causal mask); causal self-attention layers over the M latents follow; each latent
predicts the token after its position. The cost is O(N M) for the cross-attention and O(M^2 L)
for the stack, against a GPT's O(N^2 L) at the same context: the prefix is read once, not in every
layer. Trained on the latents' predictions only (M of every N tokens); evaluated with windows that
advance by M, so every scored token has at least N - M tokens of context (``split_windows``'
``score_last``; the GPT it is compared with is scored the same way).

``forward`` (models/lm.py) scores the last min(M, T) positions against the same positions of the
targets. Generation keeps no key/value cache: ``History`` holds the tokens so far and every step reads the
last N again (the engine's decode-state protocol: reset, reorder, pad, length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.models.lm import LMConfig, TiedLM
from adl_cli.nn.attention.mask import allowed_pairs


@dataclass
class PerceiverARConfig(LMConfig, ModelConfig):
    family: str = "perceiver_ar"
    block_size: int = 512  # N: the context the cross-attention reads
    latents: int = 64  # M: the last M positions are the queries and the predictions
    n_layer: int = 3  # causal self-attention layers over the latents, after the cross-attention
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    vocab_multiple: int = 64
    vocab_size: int = 0  # 0 in a recipe: the tokenizer's size, rounded up to vocab_multiple
    attention = "sdpa"  # (pretrain's log line)
    position = "learned"

    def validate(self) -> None:
        self.require_positive("block_size", "latents", "n_layer", "n_head", "n_embd", "vocab_multiple")
        if self.latents > self.block_size:
            raise ValueError(f"model.latents ({self.latents}) must be <= model.block_size ({self.block_size})")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0: the tokenizer's size), got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")



class Attention(nn.Module):
    """Multi-head attention of queries (B, Tq, C) over keys/values (B, Tk, C) under a boolean
    ``allowed`` mask ((Tq, Tk) or (B, 1, Tq, Tk))."""

    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        c = cfg.n_embd
        self.heads, self.dropout = cfg.n_head, cfg.dropout
        self.q, self.kv, self.proj = nn.Linear(c, c, bias=cfg.bias), nn.Linear(c, 2 * c, bias=cfg.bias), nn.Linear(c, c, bias=cfg.bias)

    def forward(self, z, x, allowed):
        b, tq, c = z.shape
        tk, h = x.shape[1], self.heads
        q = self.q(z).view(b, tq, h, c // h).transpose(1, 2)
        k, v = self.kv(x).view(b, tk, 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, tq, c))


class Block(nn.Module):
    """z + attention(LN(z) over LN(x)), then z + MLP(LN(z)); x is z itself in a self-attention layer."""

    def __init__(self, cfg: PerceiverARConfig, cross: bool):
        super().__init__()
        c = cfg.n_embd
        self.ln_q, self.ln_kv = nn.LayerNorm(c), (nn.LayerNorm(c) if cross else None)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c, bias=cfg.bias), nn.GELU(), nn.Linear(4 * c, c, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, z, x, allowed):
        q = self.ln_q(z)
        z = z + self.attn(q, self.ln_kv(x) if self.ln_kv is not None else q, allowed)
        return z + self.mlp(self.ln_2(z))


class History:
    """The decode state of a model without a key/value cache: each row's tokens so far (left-padded
    to one width; ``pad``: each row's padding, or None)."""

    can_be_static = False
    can_truncate = True  # speculative decoding rolls back rejected tokens

    def __init__(self, batch: int, max_len: int, device):
        self.batch, self.max_len, self.device = batch, max_len, device
        self.reset()

    def reset(self) -> None:
        self.tokens = torch.zeros(self.batch, 0, dtype=torch.long, device=self.device)
        self.pad: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def truncate(self, length: int) -> None:
        self.tokens = self.tokens[:, :length]

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens[index]
        self.batch = len(index)
        if self.pad is not None:
            self.pad = self.pad[index]


class PerceiverAR(TiedLM):
    def __init__(self, cfg: PerceiverARConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        c = cfg.n_embd
        self.tie(cfg.vocab_size, c)
        self.wpe = nn.Embedding(cfg.block_size, c)
        self.drop = nn.Dropout(cfg.dropout)
        self.cross = Block(cfg, cross=True)
        self.blocks = nn.ModuleList(Block(cfg, cross=False) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(c)
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual projections scaled down with depth (GPT-2)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (cfg.n_layer + 1)))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = super().num_params()
        return n - self.wpe.weight.numel() if non_embedding else n

    def _latents(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """(B, m, C): the last m = min(M, T) positions after the stack, normalised. ``pad`` (B,): a
        row's first pad[b] tokens are left padding: its real queries never see them, and its
        positions count from its first real token."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"a window of {t} tokens is longer than model.block_size {self.config.block_size}")
        m = min(self.config.latents, t)
        pos = torch.arange(t, device=idx.device)
        pos_b = pos[None] if pad is None else (pos[None] - pad[:, None]).clamp_min(0)
        x = self.drop(self.wte(idx) + self.wpe(pos_b))
        q_pos, lat_pos = pos[t - m:], pos[t - m:]
        cross_ok = allowed_pairs(q_pos, pos, causal=True, window=None)
        self_ok = allowed_pairs(lat_pos, lat_pos, causal=True, window=None)
        if pad is not None:  # a real query sees real keys only; a padding query padding keys only (never an empty row)
            cross_ok = cross_ok & ((pos[None, None, None] >= pad[:, None, None, None]) == (q_pos[None, None, :, None] >= pad[:, None, None, None]))
            self_ok = self_ok & ((lat_pos[None, None, None] >= pad[:, None, None, None]) == (lat_pos[None, None, :, None] >= pad[:, None, None, None]))
        z = self.cross(x[:, t - m:], x, cross_ok)
        for block in self.blocks:
            z = block(z, z, self_ok)
        return self.ln_f(z)

    # -- decoding: the engine's protocol (setup_cache, hidden) over a plain token history
    def setup_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> History:
        return History(batch, max_len or self.config.block_size, device or self.wte.weight.device)

    def hidden(self, idx: torch.Tensor, state: History | None = None) -> torch.Tensor:
        """The hidden states of ``idx``'s positions (its last M at most), after what ``state`` holds
        (which then holds ``idx`` too); only the window's last block_size tokens are read."""
        if state is None:
            return self._latents(idx)[:, -idx.shape[1]:]
        state.tokens = torch.cat([state.tokens, idx], dim=1)
        window = state.tokens[:, -self.config.block_size:]
        pad = None
        if state.pad is not None:
            pad = (state.pad - (state.length - window.shape[1])).clamp_min(0)
        return self._latents(window, pad)[:, -idx.shape[1]:]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per input token (the trainer counts a window's N tokens), in the GPT's
        convention (6 x the multiply-adds of the weights a token passes, 12 x the attention's):
        the N inputs pass the cross-attention's key/value map; the M latents pass everything
        else, and attend over N keys once and over M keys in each of the L layers."""
        cfg = self.config
        n = seq_len or cfg.block_size
        m, c, v, layers = min(cfg.latents, n), cfg.n_embd, cfg.vocab_size, cfg.n_layer
        per_window = 6 * n * 2 * c * c + m * (6 * (10 * c * c + 12 * layers * c * c + c * v) + 12 * n * c + 12 * layers * m * c)
        return per_window / n


FAMILIES.register("perceiver_ar")(Family(PerceiverARConfig, build=PerceiverAR))
