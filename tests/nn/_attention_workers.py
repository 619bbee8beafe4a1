"""Process bodies for the distributed attention tests (importable by spawned children)."""

from __future__ import annotations

import os

import torch


def ring_and_tree(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from adl_cli.nn.attention import ATTENTION
    from adl_cli.nn.attention.ring import ring_attention_distributed, shard_sequence
    from adl_cli.nn.attention.tree import tree_attention_distributed

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        naive = ATTENTION.get("naive")
        g = torch.Generator().manual_seed(0)  # every rank builds the same full tensors
        T = 4 * world * 3
        q, k, v, dout = (torch.randn(2, 4 if i != 1 and i != 2 else 2, T, 8, generator=g) for i in range(4))
        for causal in (True, False):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = naive(*full, causal=causal)
            ref_grads = torch.autograd.grad(ref, full, dout)
            mine = [shard_sequence(t, rank, world, causal=causal).clone().requires_grad_() for t in (q, k, v)]
            out = ring_attention_distributed(*mine, causal=causal, block_q=4, block_k=8)
            grads = torch.autograd.grad(out, mine, shard_sequence(dout, rank, world, causal=causal))
            err = (out - shard_sequence(ref, rank, world, causal=causal)).abs().max().item()
            assert err < 1e-5, f"ring forward, causal={causal}: {err}"
            for name, a, b in zip("qkv", grads, ref_grads):
                err = (a - shard_sequence(b, rank, world, causal=causal)).abs().max().item()
                assert err < 1e-4, f"ring d{name}, causal={causal}: {err}"
        # tree attention for decoding: 3 new queries against a cache split across the ranks
        qd = q[:, :, -3:]
        n = T // world
        out = tree_attention_distributed(qd, k[:, :, rank * n : (rank + 1) * n], v[:, :, rank * n : (rank + 1) * n],
                                         offset=rank * n, total=T)
        err = (out - naive(qd, k, v)).abs().max().item()
        assert err < 1e-5, f"tree attention: {err}"
    finally:
        dist.destroy_process_group()
