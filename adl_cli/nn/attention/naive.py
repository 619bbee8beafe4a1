"""Reference attention: out = softmax(Q K^T / sqrt(d) + bias + mask) V, fully materialised.

Vaswani et al., "Attention Is All You Need" (2017). O(T^2) memory: the slow, obvious
reference every other kernel is tested against.
"""

from __future__ import annotations

import math

import torch

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.mask import attention_mask


def expand_kv(k: torch.Tensor, n_head: int) -> torch.Tensor:
    """Repeat each key/value head so that (B, Hkv, T, D) becomes (B, n_head, T, D)."""
    n_kv = k.shape[1]
    if n_kv == n_head:
        return k
    if n_head % n_kv:
        raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv}")
    return k.repeat_interleave(n_head // n_kv, dim=1)


@ATTENTION.register("naive")
def naive_attention(q, k, v, *, causal=True, scale=None, bias=None, window=None, q_offset=None, segment_ids=None):
    n_head, tq, d = q.shape[1], q.shape[2], q.shape[3]
    k, v = expand_kv(k, n_head), expand_kv(v, n_head)
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    allowed = attention_mask(tq, tk, causal=causal, window=window, q_offset=q_offset, segment_ids=segment_ids, device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v
