"""Tree attention for decoding with the KV cache split across P shards.

Shyam, Pilault, Shepperd, Anthony, Millidge, "Tree Attention: Topology-aware Decoding
for Long-Context Attention on GPU clusters" (2024). Softmax attention is a reduction, so
each shard p computes, for its keys only, with s = q k^T * scale::

    m_p = max_j s_j,   z_p = sum_j exp(s_j - m_p),   n_p = sum_j exp(s_j - m_p) v_j

and partials combine associatively: m = max(m_a, m_b), z = z_a e^(m_a - m) + z_b e^(m_b - m),
n likewise; the output is n / z. The combine runs as a tree (log2 P pairwise levels in
one process) or as all-reduces (MAX of m, then SUM of the rescaled (z, n)) over
torch.distributed, whose collectives are themselves tree/ring reductions.
Causal masking is end-aligned as everywhere in adl: shard p knows its keys' offset.
"""

from __future__ import annotations

import math

import torch

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.mask import allowed_pairs
from adl_cli.nn.attention.naive import expand_kv


def partial(q, k, v, *, offset: int = 0, total: int | None = None, causal: bool = True, scale=None):
    """(m, z, n) of q against one KV shard whose first key sits at absolute position ``offset``
    of a cache of ``total`` keys. m, z: (B, H, Tq); n: (B, H, Tq, D)."""
    H, Tq, D = q.shape[1], q.shape[2], q.shape[3]
    k, v = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        total = offset + k.shape[2] if total is None else total
        q_pos = torch.arange(total - Tq, total, device=q.device)
        k_pos = torch.arange(offset, offset + k.shape[2], device=q.device)
        s = s.masked_fill(~allowed_pairs(q_pos, k_pos, causal=True, window=None), float("-inf"))
    m = s.amax(-1)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)  # a shard with no visible key contributes 0
    p = (s - m_safe.unsqueeze(-1)).exp()
    return m, p.sum(-1), p @ v.float()


def combine(a, b):
    """Associative combine of two (m, z, n) partials."""
    m_a, z_a, n_a = a
    m_b, z_b, n_b = b
    m = torch.maximum(m_a, m_b)
    m_safe = m.masked_fill(m == float("-inf"), 0.0)
    w_a, w_b = (m_a - m_safe).exp(), (m_b - m_safe).exp()
    return m, z_a * w_a + z_b * w_b, n_a * w_a.unsqueeze(-1) + n_b * w_b.unsqueeze(-1)


def tree_reduce(partials: list):
    """Pairwise reduction in ceil(log2 P) levels."""
    level = list(partials)
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _finish(q, m, z, n):
    return (n / z.clamp_min(torch.finfo(z.dtype).tiny).unsqueeze(-1)).to(q.dtype)


def tree_attention(q, k, v, *, shards: int = 2, causal: bool = True, scale=None):
    """Simulated tree attention: the cache split into ``shards`` pieces, reduced pairwise."""
    Tk = k.shape[2]
    bounds = [round(i * Tk / shards) for i in range(shards + 1)]
    parts = [
        partial(q, k[:, :, a:b], v[:, :, a:b], offset=a, total=Tk, causal=causal, scale=scale)
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    return _finish(q, *tree_reduce(parts))


def tree_attention_distributed(q, k, v, *, offset: int, total: int, causal: bool = True, scale=None, group=None):
    """This process holds keys [offset, offset + k.shape[2]) of ``total``; q is replicated.
    Returns the full attention output on every rank (two all-reduces)."""
    import torch.distributed as dist

    m, z, n = partial(q, k, v, offset=offset, total=total, causal=causal, scale=scale)
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    m_safe = m_all.masked_fill(m_all == float("-inf"), 0.0)
    w = (m - m_safe).exp()
    zn = torch.cat(((z * w).unsqueeze(-1), n * w.unsqueeze(-1)), dim=-1)
    dist.all_reduce(zn, op=dist.ReduceOp.SUM, group=group)
    return _finish(q, m_all, zn[..., 0], zn[..., 1:])


@ATTENTION.register("tree")
def tree_kernel(q, k, v, *, causal=True, scale=None, bias=None, window=None, shards=4):
    """Simulated tree attention over ``shards`` pieces of the KV cache (meant for decoding;
    forward-only in spirit, though autograd runs through it)."""
    if bias is not None or window is not None:
        raise ValueError("tree attention takes neither bias nor window")
    return tree_attention(q, k, v, shards=int(shards), causal=causal, scale=scale)
