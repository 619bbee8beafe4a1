"""GPT-2 (Radford et al., 2019), configurable: attention kernel and positions by name.

    x_0 = wte[idx] (+ position embedding)
    x_{l+1/2} = x_l + Attn(LN_1(x_l));  x_{l+1} = x_{l+1/2} + MLP(LN_2(x_{l+1/2}))
    logits = LN_f(x_L) wte^T                      (tied input/output embeddings)

Pre-LayerNorm blocks, a 4x GELU MLP, GPT-2 initialisation N(0, 0.02) with residual
projections scaled by 1/sqrt(2 n_layer). Parameter names follow GPT-2's layout
(transformer.h.N.attn.c_attn ...) so converting to and from transformers is a renaming.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from adl_cli.errors import closest
from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.nn.attention import ATTENTION, ATTENTION_BLOCKS, check_options
from adl_cli.nn.losses import fused_linear_cross_entropy
from adl_cli.nn.position import POSITIONS


@dataclass
class GPTConfig(ModelConfig):
    """The GPT family's config: the recipe's ``[model]`` table and the run's ``config.json``."""

    family: str = "gpt"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"  # a kernel in ATTENTION or a block in ATTENTION_BLOCKS
    position: str = "learned"
    vocab_multiple: int = 64  # pad the embedding table to a multiple of this (GPU-friendly shapes)
    vocab_size: int = 0  # 0 in a recipe: the tokenizer's size, rounded up to vocab_multiple
    loss_chunk_rows: int = 1024  # rows of logits alive at once in the fused loss (1024 x 50304 fp32: 206 MB); 0 = plain loss
    attention_options: dict[str, Any] = field(default_factory=dict)  # e.g. window, block sizes
    position_options: dict[str, Any] = field(default_factory=dict)  # e.g. rope theta, scaling

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0: the tokenizer's size), got {self.vocab_size}")
        if self.loss_chunk_rows < 0:
            raise ValueError(f"model.loss_chunk_rows must be >= 0 (0: plain logits + loss), got {self.loss_chunk_rows}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ATTENTION and self.attention not in ATTENTION_BLOCKS:
            names = ATTENTION.names() + ATTENTION_BLOCKS.names()
            raise ValueError(f"model.attention '{self.attention}' is unknown{closest(self.attention, names)}; choose from: {', '.join(names)}")
        check_options(self.attention, self.attention_options, self.block_size)
        if self.position not in POSITIONS:
            raise ValueError(f"model.position '{self.position}' is unknown{closest(self.position, POSITIONS.names())}; choose from: {', '.join(POSITIONS.names())}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is unset (multi-head attention)."""
        return self.n_kv_head or self.n_head

    def with_vocab(self, vocab_size: int) -> GPTConfig:
        """This config sized for a tokenizer of ``vocab_size`` ids (padded up to vocab_multiple)."""
        padded = math.ceil(vocab_size / self.vocab_multiple) * self.vocab_multiple
        return dataclasses.replace(self, vocab_size=padded, attention_options=dict(self.attention_options), position_options=dict(self.position_options))


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention around a kernel chosen by name.

    q, k and v are separate projections (``q_proj``, ``k_proj``, ``v_proj``) so that an adapter
    can target each by name (LoRA's default is q and v alone); run folders written with GPT-2's
    fused ``c_attn`` are split on load (``upgrade_state``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.kernel = ATTENTION.get(cfg.attention)
        self.kernel_options = dict(cfg.attention_options)

    def make_cache(self, batch: int, max_len: int, *, dtype=torch.float32, device=None):
        """This block's decode cache: a ring of the last window - 1 keys under a sliding window,
        else k and v for every position (adl_cli/nn/decode.py)."""
        from adl_cli.nn.decode import KVCache, RollingKVCache

        window = self.kernel_options.get("window")
        if window is not None:
            return RollingKVCache(batch, self.n_kv_head, int(window), self.head_dim, dtype=dtype, device=device)
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype=dtype, device=device)

    def forward(self, x, pos, position, bias=None, cache=None, segment_ids=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = position.rotate(q, pos), position.rotate(k, pos)
        if cache is not None:
            k, v = cache.append(k, v)
        extra = {} if segment_ids is None else {"segment_ids": segment_ids}
        if bias is not None and bias.shape[-1] != k.shape[2]:  # a rolling cache keeps only the last keys
            bias = bias[..., -k.shape[2]:]
        y = self.kernel(q, k, v, causal=True, bias=bias, **self.kernel_options, **extra)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        block_cls = ATTENTION_BLOCKS.get(cfg.attention) if cfg.attention in ATTENTION_BLOCKS else CausalSelfAttention
        self.attn = block_cls(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, position, bias=None, cache=None, segment_ids=None):
        x = x + self.drop(self.attn(self.ln_1(x), pos, position, bias, cache, segment_ids=segment_ids))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be >= 1 to build a model, got {cfg.vocab_size}")
        self.config = cfg
        self.activation_checkpointing = False  # the trainer's train.activation_checkpointing: recompute blocks in the backward
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                pos=POSITIONS.get(cfg.position)(
                    n_embd=cfg.n_embd,
                    head_dim=cfg.head_dim,
                    n_head=cfg.n_head,
                    block_size=cfg.block_size,
                    **cfg.position_options,
                ),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.pos.parameters())
        return n

    def setup_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None, device=None):
        """A DecodeState for ``batch`` sequences of up to ``max_len`` positions (default: the
        context), each block's cache preallocated in the model's dtype and device."""
        from adl_cli.nn.decode import DecodeState

        p = self.transformer.wte.weight
        max_len = max_len or self.config.block_size
        layers = [block.attn.make_cache(batch, max_len, dtype=dtype or p.dtype, device=device or p.device) for block in self.transformer.h]
        return DecodeState(layers, max_len)

    def hidden(self, idx: torch.Tensor, state=None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C). ``state`` (``setup_cache``) decodes: the
        tokens continue the state's positions and are appended to it. ``segment_ids`` (B, T):
        packed documents, each attending within itself only."""
        B, T = idx.shape
        start = state.length if state is not None else 0
        if start + T > self.config.block_size and self.config.position == "learned":
            raise ValueError(f"sequence of {start + T} tokens is longer than the context of {self.config.block_size}")
        tr = self.transformer
        pos = torch.arange(start, start + T, device=idx.device)
        x = tr.wte(idx)
        pe = tr.pos.embed(pos)
        if pe is not None:
            x = x + pe
        x = tr.drop(x)
        bias = tr.pos.bias(self.config.n_head, pos, torch.arange(start + T, device=idx.device))
        recompute = self.activation_checkpointing and self.training and state is None and torch.is_grad_enabled()
        for i, block in enumerate(tr.h):
            cache = None if state is None else state[i]
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, pos, tr.pos, bias, None, segment_ids, use_reentrant=False)
            else:
                x = block(x, pos, tr.pos, bias, cache, segment_ids=segment_ids)
        return tr.ln_f(x)

    def forward(self, idx, targets=None, state=None, segment_ids=None):
        """(logits, loss). With targets, loss is the mean token cross-entropy (targets -100 are
        left out) and logits is None (the fused loss never builds them); without, logits are
        (B, T, vocab). ``state``: a DecodeState to continue (``setup_cache``)."""
        h = self.hidden(idx, state, segment_ids)
        if targets is None:
            return self.lm_head(h), None
        if self.config.loss_chunk_rows > 0:
            return None, fused_linear_cross_entropy(h, self.lm_head.weight, targets, chunk_rows=self.config.loss_chunk_rows)
        logits = self.lm_head(h)
        return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 L T C (attention).

        N counts every weight once, the token table included: with tied embeddings that is the
        lm_head matmul (2 C V per token forward); the learned position table is left out (a
        lookup, not a matmul). 12 L T C is QK^T and AV over all T keys, forward and backward
        (PaLM's and nanoGPT's convention; a causal kernel does about half of it)."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * t * cfg.n_embd


def upgrade_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved with GPT-2's fused ``attn.c_attn`` (rows q | k | v) -> q_proj, k_proj, v_proj."""
    out = {}
    for name, t in tensors.items():
        if ".attn.c_attn." not in name:
            out[name] = t
            continue
        prefix, kind = name.rsplit(".c_attn.", 1)
        kv = _kv_rows(tensors, prefix)
        q_rows = t.shape[0] - 2 * kv
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split((q_rows, kv, kv), dim=0)):
            out[f"{prefix}.{proj}.{kind}"] = part.contiguous()
    return out


def fuse_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``upgrade_state``: q_proj, k_proj, v_proj -> one ``c_attn`` (rows q | k | v), GPT-2's layout."""
    out = {}
    for name, t in tensors.items():
        if ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        if ".attn.q_proj." in name:
            prefix, kind = name.rsplit(".q_proj.", 1)
            parts = [tensors[f"{prefix}.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}.c_attn.{kind}"] = torch.cat(parts, dim=0)
        else:
            out[name] = t
    return out


def _kv_rows(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """Rows of k (= of v) in a fused c_attn: its output size minus c_proj's (the query size), halved."""
    fused = tensors[f"{prefix}.c_attn.weight"].shape[0]
    q_rows = tensors[f"{prefix}.c_proj.weight"].shape[0]
    return (fused - q_rows) // 2


FAMILIES.register("gpt")(Family(GPTConfig, build=GPT, upgrade_state=upgrade_state))
