"""The decode state: cached decoding equals full recompute for every attention and position
variant; caches are preallocated and written in place; the mask (q_offset, segments) is one."""

from __future__ import annotations

import pytest
import torch

from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.nn.attention import ATTENTION, ATTENTION_BLOCKS
from adl_cli.nn.attention.naive import naive_attention
from adl_cli.nn.decode import DecodeState, KVCache, RecurrentState, RollingKVCache

OPTIONS = {"window": {"window": 4}, "s2": {"group": 4}, "ring": {"world": 2}, "tree": {"shards": 3}}
POSITIONS = ["learned", "sinusoidal", "rope", "yarn", "alibi", "none"]
NO_BIAS = {"ring", "tree", "s2"}  # kernels that refuse a score bias (ALiBi): refused up front, tested in test_attention_choices
CASES = [(a, p) for a in ATTENTION.names() + ATTENTION_BLOCKS.names() for p in POSITIONS if not (a in NO_BIAS and p == "alibi")]
CASES += [("sdpa", "rope-window"), ("naive", "alibi-window"), ("flash", "learned-window")]  # rolling caches under plain kernels


def model_for(attention: str, position: str) -> GPT:
    position, _, windowed = position.partition("-")
    opts = dict(OPTIONS.get(attention, {}))
    if windowed:
        opts["window"] = 5
    pos_opts = {"scale": 2.0} if position == "yarn" else {}
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_kv_head=2 if attention != "mla" else None, n_embd=32,
                    attention=attention, position=position, attention_options=opts, position_options=pos_opts)
    return GPT(cfg).eval()


@pytest.mark.parametrize("attention, position", CASES)
def test_cached_decoding_equals_full_recompute(attention, position):
    model = model_for(attention, position)
    seq = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
        state = model.setup_cache(2, 19)
        steps = [model(seq[:, :6], state=state)[0]]  # prefill
        steps += [model(seq[:, 6:9], state=state)[0]]  # a chunk of queries after a cache
        steps += [model(seq[:, t:t + 1], state=state)[0] for t in range(9, 19)]  # one token at a time
        assert state.length == 19
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)


def test_caches_are_preallocated_and_written_in_place():
    model = model_for("sdpa", "rope")
    state = model.setup_cache(2, 16)
    buffers = [(c.k.data_ptr(), c.v.data_ptr()) for c in state.layers]
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)), state=state)
        model(torch.randint(0, 50, (2, 1)), state=state)
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in state.layers] == buffers and state[0].k.shape == (2, 2, 16, 8)
    assert state.nbytes() == 2 * 2 * (2 * 2 * 16 * 8) * 4  # layers x (k, v) x (B H T D) x fp32
    state.reset()
    assert state.length == 0
    with pytest.raises(ValueError, match="holds 16 positions"):
        with torch.no_grad():
            model(torch.randint(0, 50, (2, 17)), state=state)


@pytest.mark.parametrize("attention", ["sdpa", "mla"])
def test_a_rolled_back_state_decodes_as_if_the_rejected_tokens_never_came(attention):
    model = model_for(attention, "rope")
    seq = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    wrong = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(seq)[0]
        state = model.setup_cache(1, 16)
        model(seq[:, :8], state=state)
        model(wrong, state=state)  # drafts, rejected
        state.truncate(8)
        assert state.length == 8
        rest = model(seq[:, 8:], state=state)[0]
    torch.testing.assert_close(rest, full[:, 8:], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate"):
        state.truncate(13)
    rolling = model_for("sdpa", "rope-window").setup_cache(1, 16)
    assert not rolling.can_truncate and state.can_truncate
    rolling.truncate(0)  # nothing to forget: allowed
    with torch.no_grad():
        model_for("sdpa", "rope-window")(seq[:, :3], state=rolling)
    with pytest.raises(ValueError, match="cannot roll back"):
        rolling.truncate(1)


def test_a_rolling_cache_keeps_only_the_window():
    c = RollingKVCache(1, 1, window=4, head_dim=2)
    keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 1, 10, 2)
    k, _ = c.append(keys[:, :, :6], keys[:, :, :6])
    assert k[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5] and c.k.shape[2] == 3
    k, _ = c.append(keys[:, :, 6:7], keys[:, :, 6:7])
    assert k[0, 0, :, 0].tolist() == [3, 4, 5, 6]  # the last W - 1 = 3 kept, then the new one
    k, _ = c.append(keys[:, :, 7:9], keys[:, :, 7:9])
    assert k[0, 0, :, 0].tolist() == [4, 5, 6, 7, 8]


def test_a_decode_state_admits_recurrent_layers():
    state = DecodeState([RecurrentState(2, 8), KVCache(2, 1, 4, 8)], max_len=4)
    state[0].update(torch.ones(2, 8), steps=3)
    state[1].append(torch.ones(2, 1, 3, 8), torch.ones(2, 1, 3, 8))
    assert state.length == 3
    state.reset()
    assert state.length == 0 and state[0].state.abs().sum() == 0 and state[1].length == 0


@pytest.mark.parametrize("kernel", ["sdpa", "flash", "window"])
def test_kernels_honour_the_query_offset(kernel):
    """Queries placed anywhere among the keys (a cache view longer than what is filled)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    opts = {"window": 4} if kernel == "window" else {}
    for off in (0, 4, 7):
        want = naive_attention(q, k, v, q_offset=off, **opts)
        got = ATTENTION.get(kernel)(q, k, v, q_offset=off, **opts)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["naive", "sdpa", "flash"])
def test_segment_masks_equal_separate_sequences(kernel):
    """Three documents packed into one row attend as if each were alone, and so does the model."""
    torch.manual_seed(0)
    lengths = [5, 8, 3]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    packed = ATTENTION.get(kernel)(q, k, v, segment_ids=seg)
    start = 0
    for n in lengths:
        alone = ATTENTION.get(kernel)(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n])
        torch.testing.assert_close(packed[:, :, start:start + n], alone, atol=1e-6, rtol=1e-5)
        start += n
    model = model_for(kernel, "rope")  # positions restart per document only through the mask: rotary is relative
    ids = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        out = model(ids, segment_ids=seg)[0]
        start = 0
        for n in lengths:
            torch.testing.assert_close(out[:, start:start + n], model(ids[:, start:start + n])[0], atol=2e-5, rtol=1e-5)
            start += n
