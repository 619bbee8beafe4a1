"""Multi-head latent attention (DeepSeek-AI, "DeepSeek-V2", 2024).

Keys and values of all heads come from one low-rank latent; only the latent (and one
small rotary key shared by the heads) is cached:

    c_kv = Norm(W_dkv x)                      (r = kv_lora_rank; the KV cache holds c_kv)
    k_h^C = W_uk,h c_kv,   v_h = W_uv,h c_kv   (per head: nope_head_dim, v_head_dim)
    k^R = RoPE(W_kr x)                        (rope_head_dim, shared; cached too)
    q_h = [q_h^C ; RoPE(q_h^R)] from W_q x, or W_uq Norm(W_dq x) when q_lora_rank > 0
    o_h = softmax([q_h^C ; q_h^R] . [k_h^C ; k^R] / sqrt(d_nope + d_rope)) v_h
    y   = W_o [o_1 ; ... ; o_H]

Absorbed form (inference): q_h^C . (W_uk,h c_kv,j) = (W_uk,h^T q_h^C) . c_kv,j and
W_o,h sum_j p_hj v_h,j = (W_o,h W_uv,h) sum_j p_hj c_kv,j, so attention runs in the
latent space against one shared key [c_kv ; k^R] and value c_kv, with W_uk folded into
the query and W_uv into the output projection. Both forms give the same output; ``absorb`` picks one ("auto":
absorbed while decoding from a cache, unabsorbed for training and prefill).

Positions. The compressed keys cannot be rotated (the rotation would sit between W_uk
and the query and break the absorption), so RoPE lives only in the decoupled rope dims:

- a RoPE-family model position (rope, pi, ntk, yarn) is re-built for rope_head_dim with
  the same options and applied to q^R and k^R; its attention factor (YaRN) scales the
  whole softmax; ``rope_theta`` must then not be given;
- any other position (none, learned, sinusoidal, alibi) keeps doing its own job
  (embeddings or score bias) and the rope dims use plain RoPE with ``rope_theta``.

Options (``attention_options``): kv_lora_rank (default 4 head_dim), q_lora_rank (0 = no
query compression), rope_head_dim (default head_dim / 2, even; 0 = no decoupled rope),
nope_head_dim and v_head_dim (default head_dim), absorb (true, false, "auto"),
rope_theta (default 10000), kernel (an ATTENTION kernel name, default "sdpa").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.errors import closest
from adl_cli.nn.attention import ATTENTION, ATTENTION_BLOCKS
from adl_cli.nn.position import POSITIONS, RotaryPosition

OPTIONS = ("kv_lora_rank", "q_lora_rank", "rope_head_dim", "nope_head_dim", "v_head_dim", "absorb", "rope_theta", "kernel")


@dataclass(frozen=True)
class MLADims:
    kv_lora_rank: int
    q_lora_rank: int
    rope_head_dim: int
    nope_head_dim: int
    v_head_dim: int
    absorb: bool | str
    rope_theta: float
    kernel: str


def mla_dims(cfg) -> MLADims:
    """Resolve and check MLA's ``attention_options`` against a GPT config."""
    opts = dict(cfg.attention_options)
    for key in opts:
        if key not in OPTIONS:
            raise ValueError(
                f"attention 'mla' has no option '{key}'{closest(key, OPTIONS)}; allowed options: {', '.join(OPTIONS)}"
            )

    def integer(key, default, minimum):
        value = opts.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"attention 'mla' option '{key}' must be an integer >= {minimum}, got {value!r}")
        return value

    hd = cfg.head_dim
    rope = integer("rope_head_dim", (hd // 2) // 2 * 2, 0)
    if rope % 2:
        raise ValueError(f"attention 'mla' option 'rope_head_dim' must be even, got {rope}")
    absorb = opts.get("absorb", "auto")
    if absorb not in (True, False, "auto"):
        raise ValueError(f"attention 'mla' option 'absorb' must be true, false or \"auto\", got {absorb!r}")
    theta = opts.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ValueError(f"attention 'mla' option 'rope_theta' must be a number > 1, got {theta!r}")
    kernel = opts.get("kernel", "sdpa")
    ATTENTION.get(kernel)  # an unknown kernel names the valid ones
    return MLADims(
        kv_lora_rank=integer("kv_lora_rank", 4 * hd, 1),
        q_lora_rank=integer("q_lora_rank", 0, 0),
        rope_head_dim=rope,
        nope_head_dim=integer("nope_head_dim", hd, 1),
        v_head_dim=integer("v_head_dim", hd, 1),
        absorb=absorb,
        rope_theta=float(theta),
        kernel=kernel,
    )


def mla_cache_bytes_per_token(kv_lora_rank: int, rope_head_dim: int, *, n_layer: int = 1, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token: the latent and the shared rope key, (r + d_rope) per layer."""
    return n_layer * (kv_lora_rank + rope_head_dim) * dtype_bytes


@ATTENTION_BLOCKS.register("mla")
class MultiHeadLatentAttention(nn.Module):
    """MLA block for GPT: ``forward(x, pos, position, bias, cache)``; its decode cache
    (``make_cache``) is a LatentCache of c_kv (B, T, r) and k_rope (B, T, d_rope)."""

    OPTIONS = OPTIONS  # the recipe's model.attention_options keys (checked when the recipe is read)

    def __init__(self, cfg):
        super().__init__()
        d = mla_dims(cfg)
        if cfg.kv_heads != cfg.n_head:
            raise ValueError("attention 'mla' shares one latent across all heads; leave n_kv_head unset")
        C, H = cfg.n_embd, cfg.n_head
        self.n_head, self.dims = H, d
        r, dr, dn, dv = d.kv_lora_rank, d.rope_head_dim, d.nope_head_dim, d.v_head_dim
        q_out = H * (dn + dr)
        if d.q_lora_rank:
            self.q_down = nn.Linear(C, d.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(d.q_lora_rank, eps=1e-6)
            self.q_up = nn.Linear(d.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(C, q_out, bias=False)
        self.kv_down = nn.Linear(C, r + dr, bias=False)  # W_dkv and W_kr stacked
        self.kv_norm = nn.RMSNorm(r, eps=1e-6)
        self.kv_up = nn.Linear(r, H * (dn + dv), bias=False)  # W_uk and W_uv, per head
        self.c_proj = nn.Linear(H * dv, C, bias=cfg.bias)
        self.kernel = ATTENTION.get(d.kernel)

        rope_model = issubclass(POSITIONS.get(cfg.position), RotaryPosition)
        if rope_model and "rope_theta" in cfg.attention_options:
            raise ValueError(
                f"attention 'mla' option 'rope_theta' conflicts with position '{cfg.position}': "
                "set theta in position_options instead"
            )
        if rope_model and dr == 0:
            raise ValueError(f"position '{cfg.position}' needs attention 'mla' option 'rope_head_dim' > 0")
        self.rotary = None
        if dr:
            self.rotary = RotaryPosition(
                n_embd=C, head_dim=dr, n_head=H, block_size=cfg.block_size, theta=d.rope_theta
            )
        self._derived: tuple[nn.Module, RotaryPosition, float] | None = None
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def cache_bytes_per_token(cfg, dtype_bytes: int) -> int:
        d = mla_dims(cfg)
        return mla_cache_bytes_per_token(d.kv_lora_rank, d.rope_head_dim, n_layer=cfg.n_layer, dtype_bytes=dtype_bytes)

    def make_cache(self, batch: int, max_len: int, *, dtype=torch.float32, device=None):
        from adl_cli.nn.decode import LatentCache

        return LatentCache(batch, max_len, self.dims.kv_lora_rank, self.dims.rope_head_dim, dtype=dtype, device=device)

    def rotary_for(self, position: nn.Module) -> tuple[RotaryPosition | None, float]:
        """(rotary for the rope dims, attention factor): derived from a RoPE-family model
        position (re-derived when it is swapped), else the block's own plain RoPE."""
        if self.rotary is None or not isinstance(position, RotaryPosition):
            return self.rotary, 1.0
        if self._derived is None or self._derived[0] is not position:
            rot = position.with_head_dim(self.dims.rope_head_dim)
            factor, rot.attention_factor = rot.attention_factor, 1.0
            self._derived = (position, rot, factor)
        return self._derived[1], self._derived[2]

    def _queries(self, x):
        if self.dims.q_lora_rank:
            return self.q_up(self.q_norm(self.q_down(x)))
        return self.q_proj(x)

    def forward(self, x, pos, position, bias=None, cache=None, absorb: bool | None = None, segment_ids=None):
        B, T, _ = x.shape
        H, d = self.n_head, self.dims
        r, dr, dn = d.kv_lora_rank, d.rope_head_dim, d.nope_head_dim
        q = self._queries(x).view(B, T, H, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split((dn, dr), dim=-1)
        c_kv, k_rope = self.kv_down(x).split((r, dr), dim=-1)
        c_kv = self.kv_norm(c_kv)
        rotary, factor = self.rotary_for(position)
        if rotary is not None:
            q_rope, k_rope = rotary.rotate(q_rope, pos), rotary.rotate(k_rope, pos)
        prior = 0
        if cache is not None:
            prior = cache.length
            c_kv, k_rope = cache.append(c_kv, k_rope)
        if segment_ids is not None:
            raise ValueError("attention 'mla' does not take segment ids (packed documents) yet; use sdpa or naive")
        if absorb is None:
            absorb = prior > 0 if d.absorb == "auto" else d.absorb
        scale = factor**2 / math.sqrt(dn + dr)
        attend = self._absorbed if absorb else self._unabsorbed
        return attend(q_nope, q_rope, c_kv, k_rope, scale, bias)

    def _unabsorbed(self, q_nope, q_rope, c_kv, k_rope, scale, bias):
        """Up-project every cached latent to per-head keys and values, then attend."""
        B, H, T, _ = q_nope.shape
        Tk, dn, dv = c_kv.shape[1], self.dims.nope_head_dim, self.dims.v_head_dim
        k_nope, v = self.kv_up(c_kv).view(B, Tk, H, dn + dv).transpose(1, 2).split((dn, dv), dim=-1)
        k = torch.cat((k_nope, k_rope[:, None].expand(B, H, Tk, -1)), dim=-1)
        y = self.kernel(torch.cat((q_nope, q_rope), dim=-1), k, v, causal=True, scale=scale, bias=bias)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * dv))

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk as (H, d_nope, r), W_o W_uv folded as (C, H r)); kept while weights are unchanged."""
        H, d = self.n_head, self.dims
        w_up, w_o = self.kv_up.weight, self.c_proj.weight
        key = (w_up.data_ptr(), w_up._version, w_o.data_ptr(), w_o._version, w_up.dtype, w_up.device)
        if self._folded is not None and self._folded[0] == key and not torch.is_grad_enabled():
            return self._folded[1], self._folded[2]
        w_uk, w_uv = w_up.view(H, d.nope_head_dim + d.v_head_dim, d.kv_lora_rank).split(
            (d.nope_head_dim, d.v_head_dim), dim=1
        )
        w_fold = torch.einsum("chv,hvr->chr", w_o.view(w_o.shape[0], H, d.v_head_dim), w_uv).flatten(1)
        if not torch.is_grad_enabled():
            self._folded = (key, w_uk, w_fold)
        return w_uk, w_fold

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, scale, bias):
        """Attention in the latent space: one shared key [c_kv ; k_rope] and value c_kv."""
        B, H, T, _ = q_nope.shape
        w_uk, w_fold = self.absorbed_weights()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope), dim=-1)
        k = torch.cat((c_kv, k_rope), dim=-1)[:, None]
        if T == 1:
            # One new token sees every cached key: lay the heads out as queries of a single
            # head so the shared latent is never copied per head (multi-query style).
            bias = None if bias is None else bias.transpose(-3, -2)
            o_latent = self.kernel(q.transpose(1, 2), k, c_kv[:, None], causal=False, scale=scale, bias=bias)
            o_latent = o_latent.transpose(1, 2)
        else:
            o_latent = self.kernel(q, k, c_kv[:, None], causal=True, scale=scale, bias=bias)  # (B, H, T, r)
        return F.linear(o_latent.transpose(1, 2).reshape(B, T, -1), w_fold, self.c_proj.bias)
