"""Ring attention: exact attention over a sequence sharded across P devices.

Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (2023). Rank r keeps its query shard Q_r; the key/value shards travel round the
ring, so at step s (s = 0..P-1) rank r holds KV from rank (r - s) mod P and computes a
partial attention (O_s, L_s) with L the row log-sum-exp. Partials merge exactly::

    L = log(exp L_a + exp L_b);   O = exp(L_a - L) O_a + exp(L_b - L) O_b

The backward sends the KV shards round the ring again together with their gradient
accumulators (dK, dV), which arrive back at their owner after P steps; every block's
gradient is recomputed from the saved O and global L (flash attention's backward).

Causal load balance (zig-zag): the sequence is cut into 2P chunks and rank r holds chunks
r and 2P-1-r, so every step costs every rank the same half block:
src == r: local causal; src < r: all queries vs the first KV chunk; src > r: the second
query chunk vs both KV chunks.

Entry points: ``ring_attention`` (simulated: all ranks in one process, gradients by
autograd through the merges), ``ring_attention_distributed`` (one shard per process over
torch.distributed: gloo on CPU, nccl on GPU) and ``shard_sequence``/``gather_sequence``.
"""

from __future__ import annotations

import math

import torch

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention_with_lse, flash_backward

# ---------------------------------------------------------------------------------- layout


def _check_len(T: int, world: int, causal: bool) -> int:
    parts = 2 * world if causal else world
    if T % parts:
        raise ValueError(f"ring attention needs the sequence length ({T}) to be a multiple of {parts} "
                         f"({'2 x ' if causal else ''}world={world})")
    return T // parts


def shard_sequence(x: torch.Tensor, rank: int, world: int, *, causal: bool = True, dim: int = 2) -> torch.Tensor:
    """Rank's part of x along dim: chunks (rank, 2P-1-rank) of 2P when causal, else shard rank of P."""
    c = _check_len(x.shape[dim], world, causal)
    if not causal:
        return x.narrow(dim, rank * c, c)
    return torch.cat((x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)), dim=dim)


def gather_sequence(shards: list[torch.Tensor], *, causal: bool = True, dim: int = 2) -> torch.Tensor:
    """Inverse of shard_sequence over all ranks."""
    if not causal:
        return torch.cat(shards, dim=dim)
    world = len(shards)
    halves = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))], dim=dim)


def _pieces(rank: int, src: int, n: int, causal: bool):
    """(query rows, key/value columns, causal) that rank's queries attend to in src's shard, or None."""
    every = slice(0, n)
    if not causal:
        return every, every, False
    c = n // 2
    if src == rank:
        return every, every, True
    if src < rank:
        return every, slice(0, c), False
    return slice(c, n), every, False


def merge(o_a, l_a, o_b, l_b):
    """Merge two partial attentions over disjoint key sets by their log-sum-exp."""
    l = torch.logaddexp(l_a, l_b)
    return o_a * (l_a - l).exp().unsqueeze(-1) + o_b * (l_b - l).exp().unsqueeze(-1), l


def _merge_rows(o, l, o_p, l_p, rows: slice):
    if rows.start == 0 and rows.stop == o.shape[2]:
        return merge(o, l, o_p, l_p)
    om, lm = merge(o[:, :, rows], l[..., rows], o_p, l_p)
    return (torch.cat((o[:, :, : rows.start], om, o[:, :, rows.stop :]), dim=2),
            torch.cat((l[..., : rows.start], lm, l[..., rows.stop :]), dim=-1))


def _partial(q, k, v, piece, scale, block_q, block_k, backend="auto"):
    rows, cols, causal = piece
    return flash_attention_with_lse(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal=causal, scale=scale,
                                    block_q=block_q, block_k=block_k, backend=backend)


# ------------------------------------------------------------------------------- simulated


def ring_attention_shards(q_shards, k_shards, v_shards, *, causal=True, scale=None,
                          block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, ranks=None):
    """Simulated ring: every rank's output shard (or only ``ranks``'), computed in one process.

    Differentiable: autograd runs through the flash partials and the log-sum-exp merges.
    """
    world = len(q_shards)
    n = q_shards[0].shape[2]
    outs = []
    for r in range(world) if ranks is None else ranks:
        o = l = None
        for s in range(world):
            src = (r - s) % world
            piece = _pieces(r, src, n, causal)
            o_p, l_p = _partial(q_shards[r], k_shards[src], v_shards[src], piece, scale, block_q, block_k)
            o, l = (o_p, l_p) if o is None else _merge_rows(o, l, o_p, l_p, piece[0])
        outs.append(o)
    return outs


def ring_attention(q, k, v, *, world: int, causal=True, scale=None, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Full-sequence convenience: shard (zig-zag when causal), run the simulated ring, gather."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("ring attention is for self-attention over one sequence (Tq == Tk)")
    shard = lambda x, r: shard_sequence(x, r, world, causal=causal)  # noqa: E731
    outs = ring_attention_shards([shard(q, r) for r in range(world)], [shard(k, r) for r in range(world)],
                                 [shard(v, r) for r in range(world)], causal=causal, scale=scale,
                                 block_q=block_q, block_k=block_k)
    return gather_sequence(outs, causal=causal)


# ----------------------------------------------------------------------------- distributed


class _DistRing:
    """Shift a tensor one step round the ring over torch.distributed."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shift(self, x: torch.Tensor):
        """Send x to rank+1 and receive rank-1's tensor; returns a thunk that waits for it."""
        dist, world = self.dist, self.world
        x = x.contiguous()
        buf = torch.empty_like(x)
        nxt = dist.get_global_rank(self.group, (self.rank + 1) % world) if self.group is not None else (self.rank + 1) % world
        prv = dist.get_global_rank(self.group, (self.rank - 1) % world) if self.group is not None else (self.rank - 1) % world
        ops = [dist.P2POp(dist.isend, x, nxt, self.group), dist.P2POp(dist.irecv, buf, prv, self.group)]
        reqs = dist.batch_isend_irecv(ops)

        def wait():
            for req in reqs:
                req.wait()
            return buf

        return wait


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, ring, block_q, block_k):
        r, world, n = ring.rank, ring.world, q.shape[2]
        kv = torch.stack((k, v))
        o = l = None
        for s in range(world):
            src = (r - s) % world
            pending = ring.shift(kv) if s < world - 1 else None
            piece = _pieces(r, src, n, causal)
            with torch.no_grad():
                o_p, l_p = _partial(q, kv[0], kv[1], piece, scale, block_q, block_k)
                o, l = (o_p, l_p) if o is None else _merge_rows(o, l, o_p, l_p, piece[0])
            if pending is not None:
                kv = pending()
        ctx.save_for_backward(q, k, v, o, l)
        ctx.cfg = (causal, scale, ring, block_q, block_k)
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, l = ctx.saved_tensors
        causal, scale, ring, block_q, block_k = ctx.cfg
        r, world, n = ring.rank, ring.world, q.shape[2]
        delta = (dout.float() * o.float()).sum(-1)
        dq = torch.zeros_like(q, dtype=torch.float32)
        # one message per step: the KV block with its gradient accumulators
        buf = torch.cat((torch.stack((k, v)).float(), torch.zeros(2, *k.shape, dtype=torch.float32, device=k.device)))
        for s in range(world):
            src = (r - s) % world
            rows, cols, pc = _pieces(r, src, n, causal)
            kk, vv = buf[0].to(k.dtype), buf[1].to(v.dtype)
            dq_p, dk_p, dv_p, _ = flash_backward(
                q[:, :, rows], kk[:, :, cols], vv[:, :, cols], None, l[..., rows], dout[:, :, rows],
                causal=pc, scale=scale, block_q=block_q, block_k=block_k, delta=delta[..., rows],
            )
            dq[:, :, rows] += dq_p
            buf[2][:, :, cols] += dk_p
            buf[3][:, :, cols] += dv_p
            buf = ring.shift(buf)()  # after the last shift each rank holds its own block's gradients
        return dq.to(q.dtype), buf[2].to(k.dtype), buf[3].to(v.dtype), None, None, None, None, None


def ring_attention_distributed(q, k, v, *, causal=True, scale=None, group=None,
                               block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """This process's output shard; q, k, v are its shards (``shard_sequence`` layout)."""
    ring = _DistRing(group)
    if causal and q.shape[2] % 2:
        raise ValueError("causal ring attention needs an even shard length (two zig-zag chunks)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _RingFunction.apply(q, k, v, causal, scale, ring, block_q, block_k)


# ---------------------------------------------------------------------------------- memory


class _SoloRing:
    """One rank of a P-rank ring run alone: received blocks come from a local list, gradients
    sent onwards are dropped. Time and memory are those of one rank; communication is free."""

    def __init__(self, rank, world, k_shards, v_shards):
        self.rank, self.world = rank, world
        self.k_shards, self.v_shards = k_shards, v_shards
        self.steps = {"forward": 0, "backward": 0}

    def shift(self, x):
        kind = "forward" if x.shape[0] == 2 else "backward"  # (k, v) or (k, v, dk, dv)
        self.steps[kind] += 1
        src = (self.rank - self.steps[kind]) % self.world
        if kind == "forward":
            nxt = torch.stack((self.k_shards[src], self.v_shards[src]))
        else:
            nxt = torch.zeros_like(x)
            nxt[0], nxt[1] = self.k_shards[src], self.v_shards[src]
        return lambda: nxt


def ring_rank(q_shard, k_shards, v_shards, *, rank=0, causal=True, scale=None,
              block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """One rank's ring forward (backward-able) alone, for measuring per-shard time and memory."""
    world = len(k_shards)
    ring = _SoloRing(rank, world, k_shards, v_shards)
    if scale is None:
        scale = 1.0 / math.sqrt(q_shard.shape[-1])
    return _RingFunction.apply(q_shard, k_shards[rank], v_shards[rank], causal, scale, ring, block_q, block_k)


def shard_bytes(seq: int, world: int, *, batch: int, heads: int, head_dim: int, dtype=torch.float32,
                kv_heads: int | None = None, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> dict:
    """Analytic per-rank sizes (bytes): resident shards, KV blocks in flight, and one score tile."""
    el = torch.tensor([], dtype=dtype).element_size()
    kv_heads = kv_heads or heads
    n = seq // world
    q = batch * heads * n * head_dim * el
    kv = 2 * batch * kv_heads * n * head_dim * el
    return {
        "q_out_lse": 2 * q + batch * heads * n * 4,
        "kv_resident": kv,
        "kv_in_flight": kv,  # the block being received while the current one is used
        "score_tile": batch * heads * min(block_q, n) * min(block_k, n) * 4,
    }


@ATTENTION.register("ring")
def ring_kernel(q, k, v, *, causal=True, scale=None, bias=None, window=None, world=4,
                block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Simulated ring attention with ``world`` shards. Decoding (Tq != Tk) has no sequence to
    shard: it uses tree attention, ring attention's decoding counterpart."""
    if bias is not None or window is not None:
        raise ValueError("ring attention takes neither bias nor window")
    if q.shape[2] != k.shape[2]:
        from adl_cli.nn.attention.tree import tree_attention

        return tree_attention(q, k, v, shards=world, causal=causal, scale=scale)
    if q.shape[2] % (2 * int(world) if causal else int(world)):
        # a prompt too short or odd to shard (sampling): the same attention, unsharded
        from adl_cli.nn.attention.flash import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
    return ring_attention(q, k, v, world=int(world), causal=causal, scale=scale, block_q=block_q, block_k=block_k)


def _check_ring_options(options: dict, block_size: int) -> None:
    world = options.get("world", 4)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"model.attention_options.world must be an integer >= 1, got {world!r}")


ring_kernel.check_options = _check_ring_options
ring_kernel.refused = ("window",)
