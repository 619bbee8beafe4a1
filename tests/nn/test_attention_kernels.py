"""Attention kernels against the materialised reference (naive), forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.flash import flash_attention_with_lse
from adl_cli.nn.attention.mask import attention_mask
from adl_cli.nn.attention.naive import expand_kv
from adl_cli.nn.attention.ring import gather_sequence, ring_attention, shard_sequence
from adl_cli.nn.attention.tree import tree_attention

naive = ATTENTION.get("naive")


def _inputs(tq, tk, h=4, hkv=2, d=8, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    dout = torch.randn(b, h, tq, d, generator=g)
    return q, k, v, dout


def _run(fn, q, k, v, dout, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), grads


def _close(ref, got, fwd_tol=1e-5, grad_tol=1e-4):
    (o1, g1), (o2, g2) = ref, got
    assert (o1 - o2).abs().max().item() < fwd_tol
    for a, b in zip(g1, g2):
        assert (a - b).abs().max().item() < grad_tol


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [1, 7, 33, 100])
@pytest.mark.parametrize("blocks", [(16, 16), (8, 32), (32, 8), (256, 256)])
def test_flash_matches_naive(causal, t, blocks):
    q, k, v, dout = _inputs(t, t)
    ref = _run(naive, q, k, v, dout, causal=causal)
    got = _run(ATTENTION.get("flash"), q, k, v, dout, causal=causal, block_q=blocks[0], block_k=blocks[1])
    _close(ref, got)


@pytest.mark.parametrize("tq,tk", [(1, 37), (5, 40), (16, 16)])
def test_flash_decoding_is_end_aligned(tq, tk):
    q, k, v, dout = _inputs(tq, tk, h=4, hkv=1)
    _close(_run(naive, q, k, v, dout), _run(ATTENTION.get("flash"), q, k, v, dout, block_q=4, block_k=8))


def test_flash_lse_is_logsumexp_of_scaled_masked_scores():
    q, k, v, _ = _inputs(21, 21)
    _, lse = flash_attention_with_lse(q, k, v, causal=True, block_q=8, block_k=4)
    s = q @ expand_kv(k, 4).transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~attention_mask(21, 21, causal=True, window=None), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)


def test_flash_bias_and_its_gradient():
    q, k, v, dout = _inputs(12, 12)
    bias = torch.randn(1, 4, 12, 12, requires_grad=True)
    out1 = naive(q, k, v, bias=bias)
    (g1,) = torch.autograd.grad(out1, bias, dout)
    out2 = ATTENTION.get("flash")(q, k, v, bias=bias, block_q=4, block_k=8)
    (g2,) = torch.autograd.grad(out2, bias, dout)
    assert (out1 - out2).abs().max() < 1e-5 and (g1 - g2).abs().max() < 1e-5


def test_flash_value_head_size_may_differ():
    q, k, _, _ = _inputs(11, 11)
    v = torch.randn(2, 2, 11, 5)
    dout = torch.randn(2, 4, 11, 5)
    _close(_run(naive, q, k, v, dout), _run(ATTENTION.get("flash"), q, k, v, dout, block_q=4, block_k=4))


def test_flash_half_precision_runs_in_float32():
    q, k, v, _ = _inputs(10, 10)
    out = ATTENTION.get("flash")(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_q=4, block_k=4)
    assert out.dtype == torch.bfloat16
    assert (out.float() - naive(q, k, v)).abs().max() < 0.05


@pytest.mark.parametrize("name", ["flash", "window"])
@pytest.mark.parametrize("causal", [True, False])
def test_window_matches_band_masked_naive(name, causal):
    q, k, v, dout = _inputs(40, 40)
    ref = _run(naive, q, k, v, dout, causal=causal, window=7)
    _close(ref, _run(ATTENTION.get(name), q, k, v, dout, causal=causal, window=7, block_q=8, block_k=16))


def test_window_needs_a_window():
    q, k, v, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match="window"):
        ATTENTION.get("window")(q, k, v)


@pytest.mark.parametrize("name", ["naive", "sdpa", "flash"])
def test_gqa_with_as_many_kv_heads_is_mha(name):
    q, k, v, dout = _inputs(9, 9, h=4, hkv=4)
    ref = _run(naive, q, k, v, dout)
    kv_rep = _run(ATTENTION.get(name), q, k, v, dout, **({"block_q": 4, "block_k": 4} if name == "flash" else {}))
    _close(ref, kv_rep)
    # and grouped heads equal MHA with each key/value head repeated
    q, k, v, dout = _inputs(9, 9, h=4, hkv=2)
    out_gqa = ATTENTION.get(name)(q, k, v)
    out_mha = naive(q, expand_kv(k, 4), expand_kv(v, 4))
    assert (out_gqa - out_mha).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_naive(causal):
    q, k, v, dout = _inputs(13, 13)
    _close(_run(naive, q, k, v, dout, causal=causal), _run(ATTENTION.get("sdpa"), q, k, v, dout, causal=causal))


def test_s2_with_one_group_is_full_causal_attention():
    q, k, v, dout = _inputs(16, 16)
    _close(_run(naive, q, k, v, dout), _run(ATTENTION.get("s2"), q, k, v, dout, group=16))


def test_s2_matches_its_mask():
    """Unshifted heads attend inside groups of G; shifted heads inside groups moved by G/2
    (the last wrapping round), causal by original position."""
    T, G = 16, 4
    q, k, v, dout = _inputs(T, T, h=4, hkv=4)
    pos = torch.arange(T)
    same = (pos[:, None] // G) == (pos[None, :] // G)
    shifted = ((pos - G // 2) % T)
    same_shifted = (shifted[:, None] // G) == (shifted[None, :] // G)
    causal = pos[None, :] <= pos[:, None]
    mask = torch.stack([same, same, same_shifted, same_shifted])[None] & causal
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    ref = _run(naive, q, k, v, dout, causal=False, bias=bias)
    _close(ref, _run(ATTENTION.get("s2"), q, k, v, dout, group=G))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_simulated_matches_full(world, causal):
    T = 2 * world * 3
    q, k, v, dout = _inputs(T, T)
    _close(_run(naive, q, k, v, dout, causal=causal),
           _run(lambda q, k, v: ring_attention(q, k, v, world=world, causal=causal, block_q=4, block_k=4), q, k, v, dout))


def test_zigzag_shards_round_trip():
    x = torch.arange(24.0).view(1, 1, 24, 1)
    shards = [shard_sequence(x, r, 3) for r in range(3)]
    assert shards[0].flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    assert torch.equal(gather_sequence(shards), x)


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
@pytest.mark.parametrize("tq", [1, 4])
def test_tree_matches_full(shards, tq):
    q, k, v, _ = _inputs(tq, 23)
    assert (tree_attention(q, k, v, shards=shards) - naive(q, k, v)).abs().max() < 1e-5
    assert (ATTENTION.get("tree")(q, k, v, shards=shards, causal=False) - naive(q, k, v, causal=False)).abs().max() < 1e-5


def test_gpt_flash_loss_equals_naive():
    from adl_cli.models.gpt import GPT, GPTConfig

    idx = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, opts in (("naive", {}), ("flash", {"block_q": 8, "block_k": 16}), ("ring", {"world": 2})):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                        attention=name, attention_options=opts)
        model = GPT(cfg)
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss.backward()
        losses[name] = (loss.item(), model.transformer.h[0].attn.q_proj.weight.grad.clone())
    for name in ("flash", "ring"):
        assert abs(losses[name][0] - losses["naive"][0]) < 1e-5
        assert (losses[name][1] - losses["naive"][1]).abs().max() < 1e-5


def test_auto_backend_picks_triton_only_for_cuda_inputs_it_supports():
    """The dispatch decision itself, with stand-in CUDA tensors (no GPU needed)."""
    from types import SimpleNamespace

    from adl_cli.nn.attention import flash, flash_triton

    def fake(d, dtype=torch.bfloat16):
        return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 2, 8, d))

    q = fake(64)
    assert flash._use_triton(q, fake(64), None, "auto") == flash_triton.available()
    assert flash._use_triton(q, fake(32), None, "auto") is False  # value head size differs
    assert flash._use_triton(q, fake(64), torch.zeros(1), "auto") is False  # bias: torch path
    assert flash._use_triton(torch.zeros(1, 2, 8, 64), torch.zeros(1, 2, 8, 64), None, "auto") is False


@pytest.mark.parametrize("sorted_ids", [True, False])
def test_flash_packed_documents_match_naive_forward_and_backward(sorted_ids):
    """Segment masks through the tiled kernel with small tiles (so whole tiles between documents
    are skipped), grouped-query heads, rows packed differently; gradients against naive's."""
    from adl_cli.nn.attention.flash import _Plan, flash_attention
    from adl_cli.nn.attention.naive import naive_attention

    torch.manual_seed(0)
    T = 24
    rows = [[5, 8, 3, 8], [12, 12], [4, 4, 16]]
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)])[:T] for r in rows])
    if not sorted_ids:
        seg = (seg * 7) % 5  # ids that repeat out of order: masked pairwise, no tile skipped
    q = torch.randn(3, 4, T, 8, requires_grad=True)
    k = torch.randn(3, 2, T, 8, requires_grad=True)
    v = torch.randn(3, 2, T, 8, requires_grad=True)
    want = naive_attention(q, k, v, segment_ids=seg)
    got = flash_attention(q, k, v, segment_ids=seg, block_q=4, block_k=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32, sums over at most 24 keys
    g = torch.randn_like(want)
    dw = torch.autograd.grad(want, (q, k, v), g)
    dg = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(dg, dw):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plan = _Plan(T, T, True, None, 4, 4, q.device, None, seg)
    skipped = sum(plan.skip(q0, q1, k0, k1) for q0, q1 in plan.q_blocks() for k0, k1 in plan.k_chunks(q0, q1))
    assert (skipped > 0) == sorted_ids  # tiles across documents in every row are never computed
