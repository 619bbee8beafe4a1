"""GPT-2 (Radford et al., 2019), configurable: attention kernel and positions by name.

    x_0 = wte[idx] (+ position embedding)
    x_{l+1/2} = x_l + Attn(LN_1(x_l));  x_{l+1} = x_{l+1/2} + MLP(LN_2(x_{l+1/2}))
    logits = LN_f(x_L) wte^T                      (tied input/output embeddings)

Pre-LayerNorm blocks, a 4x GELU MLP, GPT-2 initialisation N(0, 0.02) with residual
projections scaled by 1/sqrt(2 n_layer). Parameter names follow GPT-2's layout
(transformer.h.N.attn.c_proj ...; q, k, v are separate) so converting to and from
transformers is a renaming plus one concatenation.

Modern options, each a recipe switch (defaults give GPT-2):
- ``norm = "rmsnorm"``: RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm (nn/norms.py);
- ``mlp = "swiglu" | "relu2"``: gated SiLU (Shazeer 2020) or squared ReLU (So et al. 2021) (nn/mlp.py);
- ``qk_norm``: RMSNorm on each head's queries and keys before the rotation (Dehghani et al.
  2023; OLMo 2), which bounds the attention logits;
- ``tie_embeddings = false``: a separate output matrix (untied input/output embeddings);
- ``zero_init_proj``: the residual output projections start at zero, so every block starts as
  the identity (modded-nanogpt; "ReZero"-like, Bachlechner et al. 2020);
- ``logit_softcap = c``: logits c tanh(z / c) (Gemma 2, Team et al. 2024);
- ``unet_skips``: the first half's block outputs are added, with learned weights, to the inputs of
  the mirrored blocks of the second half (modded-nanogpt's U-net skips);
- ``mtp_heads = k``: k auxiliary heads, head d (one extra block each, the shared unembedding)
  predicting token t + 1 + d from position t, trained with weight ``mtp_weight`` (Gloeckle et al.,
  "Better & Faster Large Language Models via Multi-token Prediction", 2024); evaluation and
  generation use the next-token head only.
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
from adl_cli.nn.attention.mask import segment_positions
from adl_cli.nn.losses import fused_linear_cross_entropy
from adl_cli.nn.norms import NORMS
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
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | relu2 | swiglu
    mlp_hidden: int = 0  # inner width; 0: 4 n_embd (gelu, relu2) or 8/3 n_embd rounded up to 64 (swiglu)
    qk_norm: bool = False  # RMSNorm on each head's q and k
    tie_embeddings: bool = True  # the output matrix is the token embedding table
    zero_init_proj: bool = False  # residual output projections start at zero
    logit_softcap: float = 0.0  # > 0: logits c * tanh(logits / c)
    unet_skips: bool = False  # first-half block outputs feed the mirrored second-half blocks
    mtp_heads: int = 0  # auxiliary multi-token-prediction heads (token t + 1 + d)
    mtp_weight: float = 0.3  # weight of their mean loss in the training loss
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
        from adl_cli.nn.mlp import MLPS
        from adl_cli.nn.norms import NORMS

        for key, reg in (("norm", NORMS), ("mlp", MLPS)):
            value = getattr(self, key)
            if value not in reg:
                raise ValueError(f"model.{key} '{value}' is unknown{closest(value, reg.names())}; choose from: {', '.join(reg.names())}")
        if self.mlp_hidden < 0 or self.mtp_heads < 0:
            raise ValueError(f"model.mlp_hidden and model.mtp_heads must be >= 0, got {self.mlp_hidden} and {self.mtp_heads}")
        if self.logit_softcap < 0 or self.mtp_weight < 0:
            raise ValueError(f"model.logit_softcap and model.mtp_weight must be >= 0 (0: off), got {self.logit_softcap} and {self.mtp_weight}")
        if self.qk_norm and self.attention in ATTENTION_BLOCKS:
            raise ValueError(f"model.qk_norm applies to the standard attention block, not to '{self.attention}'")
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
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if cfg.qk_norm else None

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = position.rotate(q, pos), position.rotate(k, pos)
        if cache is not None:
            k, v = cache.append(k, v)
        extra = {} if segment_ids is None else {"segment_ids": segment_ids}
        if bias is not None and bias.shape[-1] != k.shape[2]:  # a rolling cache keeps only the last keys
            bias = bias[..., -k.shape[2]:]
        y = self.kernel(q, k, v, causal=True, bias=bias, **self.kernel_options, **extra)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from adl_cli.nn.mlp import MLPS, default_hidden
        from adl_cli.nn.norms import NORMS

        norm = NORMS.get(cfg.norm)
        self.ln_1 = norm(cfg.n_embd, bias=cfg.bias)
        block_cls = ATTENTION_BLOCKS.get(cfg.attention) if cfg.attention in ATTENTION_BLOCKS else CausalSelfAttention
        self.attn = block_cls(cfg)
        self.ln_2 = norm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLPS.get(cfg.mlp)(cfg.n_embd, cfg.mlp_hidden or default_hidden(cfg.mlp, cfg.n_embd), bias=cfg.bias)
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
                ln_f=NORMS.get(cfg.norm)(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.n_skips = cfg.n_layer // 2 if cfg.unet_skips else 0
        if self.n_skips:
            self.skip_weights = nn.Parameter(torch.ones(self.n_skips))
        if cfg.mtp_heads:
            self.mtp = nn.ModuleList(Block(cfg) for _ in range(cfg.mtp_heads))
        self.aux_metrics: dict[str, torch.Tensor] = {}  # the last training forward's loss parts (multi-token prediction)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
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
        """Final-norm hidden states (B, T, C); see ``_hidden``."""
        return self._hidden(idx, state, segment_ids)[0]

    def _hidden(self, idx: torch.Tensor, state=None, segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Final-norm hidden states (B, T, C), the last block's output). ``state`` (``setup_cache``) decodes: the
        tokens continue the state's positions and are appended to it. ``segment_ids`` (B, T):
        packed documents, each attending within itself only, positions restarting at its start."""
        B, T = idx.shape
        if state is not None and state.static:
            return self._static_step(idx, state)
        start = state.length if state is not None else 0
        pad = state.pad if state is not None else None
        longest = start + T - (0 if pad is None else int(pad.min()))  # the longest row's real length
        if longest > self.config.block_size and self.config.position == "learned":
            raise ValueError(f"sequence of {longest} tokens is longer than the context of {self.config.block_size}")
        tr = self.transformer
        pos = torch.arange(start, start + T, device=idx.device)
        # Left-padded rows count their positions from their first real token: (B, T) positions.
        row_pos = pos if pad is None else (pos[None, :] - pad[:, None]).clamp_min(0)
        if segment_ids is not None:  # packed documents: positions restart at each document's start
            if state is not None:
                raise ValueError("segment_ids (packed documents) are for whole sequences, not for decoding with a cache")
            row_pos = segment_positions(segment_ids)
        x = self._embed(idx, row_pos)
        bias = tr.pos.bias(self.config.n_head, pos, torch.arange(start + T, device=idx.device))  # relative: shared positions serve
        if pad is not None:
            bias = padding_bias(pad, start, T, idx.device) + (0.0 if bias is None else bias)
        x = self._blocks(x, row_pos, bias, state, segment_ids)
        return tr.ln_f(x), x  # (final hidden states, the last block's output: the multi-token heads' input)

    def _static_step(self, idx: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
        """T tokens per row written from ``state.position`` (a tensor) on: every shape and Python
        value is the same from one step to the next, so torch.compile traces it once. Keys past
        each query's position (not written yet) and left padding are masked through the score bias."""
        tr, pad, T = self.transformer, state.pad, idx.shape[1]
        keys = torch.arange(state.max_len, device=idx.device)
        q_pos = state.position + torch.arange(T, device=idx.device)  # (T,)
        seen = keys[None, :] <= q_pos[:, None]  # (T, max_len)
        row_pos = q_pos
        if pad is not None:
            seen = seen[None] & (keys[None, None, :] >= pad[:, None, None])  # (B, T, max_len)
            row_pos = (q_pos[None, :] - pad[:, None]).clamp_min(0)
        bias = torch.zeros(seen.shape, device=idx.device).masked_fill(~seen, float("-inf"))
        bias = bias[:, None] if pad is not None else bias[None, None]  # (B | 1, 1, T, max_len)
        alibi = tr.pos.bias(self.config.n_head, q_pos, keys)
        if alibi is not None:
            bias = bias + alibi
        x = self._blocks(self._embed(idx, row_pos), row_pos, bias, state, None)
        return tr.ln_f(x), x

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus the position encoding's (positions (T,) or per row (B, T)), dropout."""
        tr = self.transformer
        x = tr.wte(idx)
        pe = tr.pos.embed(pos)
        return tr.drop(x if pe is None else x + pe)

    def _run_block(self, block, x, pos, bias, cache, segment_ids):
        if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, pos, self.transformer.pos, bias, None, segment_ids, use_reentrant=False)
        return block(x, pos, self.transformer.pos, bias, cache, segment_ids=segment_ids)

    def _blocks(self, x, pos, bias, state, segment_ids):
        """The blocks in order; with U-net skips the first n_skips outputs are kept and added
        (weighted) to the inputs of the last n_skips blocks, mirrored."""
        layers = self.transformer.h
        skips = []
        first_decoder = len(layers) - self.n_skips
        for i, block in enumerate(layers):
            if self.n_skips and i >= first_decoder:
                j = i - first_decoder
                x = x + self.skip_weights[j] * skips[self.n_skips - 1 - j]
            x = self._run_block(block, x, pos, bias, None if state is None else state[i], segment_ids)
            if i < self.n_skips:
                skips.append(x)
        return x

    def forward(self, idx, targets=None, state=None, segment_ids=None):
        """(logits, loss). With targets, loss is the mean token cross-entropy (targets -100 are
        left out) and logits is None (the fused loss never builds them); without, logits are
        (B, T, vocab). ``state``: a DecodeState to continue (``setup_cache``)."""
        h, trunk = self._hidden(idx, state, segment_ids)
        if targets is None:
            return self.logits(h), None
        loss = self.token_loss(h, targets)
        if self.config.mtp_heads and self.training:
            loss = self._with_multi_token_loss(loss, trunk, targets, segment_ids)
        return None, loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.lm_head(h)
        cap = self.config.logit_softcap
        return cap * torch.tanh(z / cap) if cap else z

    def head_weight(self) -> torch.Tensor | None:
        """The output matrix the fused loss multiplies by: the head's weight, or with trainable
        token rows (adapters/tokens.py) the weight with those rows replaced; None when an adapter
        wraps the head otherwise (LoRA on lm_head): then the loss goes through ``logits``."""
        head = self.lm_head
        if isinstance(head, nn.Linear):
            return head.weight
        merged = getattr(head, "get_merged_weights", None)
        if merged is not None and not head.merged and not head.disable_adapters:
            return merged(head.active_adapters)
        return None

    def token_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the (soft-capped) logits of h against targets (-100: left out)."""
        weight = self.head_weight()
        if self.config.loss_chunk_rows > 0 and weight is not None:
            return fused_linear_cross_entropy(h, weight, targets, chunk_rows=self.config.loss_chunk_rows,
                                              softcap=self.config.logit_softcap)
        return F.cross_entropy(self.logits(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def _with_multi_token_loss(self, loss: torch.Tensor, trunk: torch.Tensor, targets: torch.Tensor, segment_ids) -> torch.Tensor:
        """Head d (d = 1..k) reads the trunk through one more block and predicts token t + 1 + d,
        which is targets[:, t + d]; the last d positions have no such token."""
        T = targets.shape[1]
        pos = torch.arange(T, device=targets.device)
        bias = self.transformer.pos.bias(self.config.n_head, pos, pos)
        block_pos = pos if segment_ids is None else segment_positions(segment_ids)
        aux = []
        for d, head in enumerate(self.mtp, start=1):
            shifted = torch.full_like(targets, -100)
            shifted[:, : T - d] = targets[:, d:]
            if segment_ids is not None:  # a packed document's token t + 1 + d may be the next document's
                shifted[:, : T - d].masked_fill_(segment_ids[:, d:] != segment_ids[:, : T - d], -100)
            h = self.transformer.ln_f(self._run_block(head, trunk, block_pos, bias, None, segment_ids))
            aux.append(self.token_loss(h, shifted))
        mtp = torch.stack(aux).mean()
        self.aux_metrics = {"next_token_loss": loss.detach(), "mtp_loss": mtp.detach()}
        return loss + self.config.mtp_weight * mtp

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 L T C (attention).

        N counts every weight once, the token table included: with tied embeddings that is the
        lm_head matmul (2 C V per token forward); the learned position table is left out (a
        lookup, not a matmul). 12 L T C is QK^T and AV over all T keys, forward and backward
        (PaLM's and nanoGPT's convention; a causal kernel does about half of it)."""
        cfg = self.config
        t = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * t * cfg.n_embd


def padding_bias(pad: torch.Tensor, start: int, T: int, device=None) -> torch.Tensor:
    """Additive score bias (B, 1, T, start + T) for left-padded rows: a real query sees real keys
    only and a padding query padding keys only (it sees itself, so no row of the softmax is empty)."""
    real = torch.arange(start + T, device=device)[None, :] >= pad[:, None].to(device)  # (B, Tk)
    same = real[:, start:, None] == real[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, float("-inf"))[:, None]


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
