"""Ring and tree attention across 2 real processes (gloo) == full attention; the Triton
kernels under triton's CPU interpreter == the reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.dist
def test_ring_and_tree_over_two_processes():
    from _attention_workers import ring_and_tree

    ctx = mp.start_processes(ring_and_tree, args=(2, 29517), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("ring/tree processes did not finish within 90 s")


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from adl_cli.nn.attention import ATTENTION
    from adl_cli.nn.attention.flash_triton import triton_attention_with_lse
    naive = ATTENTION.get("naive")
    g = torch.Generator().manual_seed(0)
    cases = [(7, 7, 2, 1, True, None), (40, 40, 2, 2, False, None), (5, 37, 2, 1, True, None),
             (40, 40, 2, 1, True, 6), (33, 33, 2, 2, False, 5)]
    for tq, tk, h, hkv, causal, window in cases:
        q = torch.randn(1, h, tq, 8, generator=g, requires_grad=True)
        k = torch.randn(1, hkv, tk, 8, generator=g, requires_grad=True)
        v = torch.randn(1, hkv, tk, 8, generator=g, requires_grad=True)
        dout = torch.randn(1, h, tq, 8, generator=g)
        ref = naive(q, k, v, causal=causal, window=window)
        ref_g = torch.autograd.grad(ref, (q, k, v), dout)
        out, lse = triton_attention_with_lse(q, k, v, causal=causal, window=window, block_m=16, block_n=16)
        got_g = torch.autograd.grad(out, (q, k, v), dout)
        assert (out - ref).abs().max() < 1e-5, (tq, tk, causal, window)
        for a, b in zip(ref_g, got_g):
            assert (a - b).abs().max() < 1e-4, (tq, tk, causal, window)
        out2 = ATTENTION.get("flash")(q, k, v, causal=causal, window=window, backend="triton")
        assert (out2 - ref).abs().max() < 1e-5
    print("ok")
    """
)


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # the interpreter flag is read when a kernel is decorated, i.e. at import: a fresh process
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
