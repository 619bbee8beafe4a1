import pytest
import torch

from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.nn.attention.cache import cache_bytes, kv_cache_bytes_per_token
from adl_cli.nn.attention.mla import MultiHeadLatentAttention, mla_cache_bytes_per_token
from adl_cli.nn.position import POSITIONS, with_position


def config(position="none", position_options=None, **attention_options):
    return GPTConfig(
        vocab_size=40, block_size=12, n_layer=2, n_head=3, n_embd=24, attention="mla",
        position=position, position_options=position_options or {}, attention_options=attention_options,
    )


def position_for(cfg):
    return POSITIONS.get(cfg.position)(
        n_embd=cfg.n_embd, head_dim=cfg.head_dim, n_head=cfg.n_head, block_size=cfg.block_size, **cfg.position_options
    )


@pytest.mark.parametrize(
    "position,options",
    [
        ("rope", {}),
        ("yarn", {"q_lora_rank": 10, "v_head_dim": 6, "nope_head_dim": 5}),
        ("alibi", {"kernel": "naive", "rope_head_dim": 0}),
    ],
)
def test_absorbed_equals_unabsorbed(position, options):
    torch.manual_seed(0)
    cfg = config(position, **options)
    block, position = MultiHeadLatentAttention(cfg), position_for(cfg)
    for p in block.parameters():  # non-trivial norms too
        torch.nn.init.normal_(p, std=0.3)
    x, pos = torch.randn(2, 7, 24), torch.arange(7)
    bias = position.bias(3, pos, pos)
    naive = block(x, pos, position, bias, absorb=False)
    absorbed = block(x, pos, position, bias, absorb=True)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)
    # One decoding step from a cache, both ways.
    cache_a, cache_b = block.make_cache(2, 8), block.make_cache(2, 8)
    block(x, pos, position, bias, cache=cache_a, absorb=False)
    block(x, pos, position, bias, cache=cache_b, absorb=True)
    x1, pos1 = torch.randn(2, 1, 24), torch.tensor([7])
    bias1 = position.bias(3, pos1, torch.arange(8))
    torch.testing.assert_close(
        block(x1, pos1, position, bias1, cache=cache_a, absorb=True),
        block(x1, pos1, position, bias1, cache=cache_b, absorb=False),
        atol=1e-5, rtol=1e-5,
    )


def decode_matches_full(model, seq, prefill):
    model.eval()
    with torch.no_grad():
        full, _ = model(seq)
        state = model.setup_cache(seq.shape[0], seq.shape[1])
        steps = [model(seq[:, :prefill], state=state)[0]]
        steps += [model(seq[:, t : t + 1], state=state)[0] for t in range(prefill, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    return state


@pytest.mark.parametrize(
    "position,options",
    [("none", {}), ("rope", {}), ("yarn", {"scale": 4.0}), ("alibi", {}), ("learned", {})],
)
def test_gpt_with_mla_decodes_like_full_recompute(position, options):
    torch.manual_seed(0)
    model = GPT(config(position, options, q_lora_rank=8))
    length = 12 if position == "learned" else 18
    decode_matches_full(model, torch.randint(0, 40, (2, length)), prefill=5)


def test_cache_holds_only_latent_and_rope_key():
    torch.manual_seed(0)
    cfg = config(kv_lora_rank=10, rope_head_dim=4)
    state = decode_matches_full(GPT(cfg), torch.randint(0, 40, (1, 9)), prefill=4)
    assert all({n for n, _ in c.named_buffers()} == {"c_kv", "k_rope"} and c.length == 9 for c in state.layers)
    assert state[0].c_kv.shape == (1, 9, 10) and state[0].k_rope.shape == (1, 9, 4)
    per_token = mla_cache_bytes_per_token(10, 4, n_layer=2, dtype_bytes=4)
    assert per_token == 2 * (10 + 4) * 4
    assert cache_bytes(state) == 9 * per_token
    assert kv_cache_bytes_per_token(cfg, 4) == per_token


@pytest.mark.parametrize("n_kv_head", [3, 1])
def test_kv_cache_bytes_for_mha_and_gqa(n_kv_head):
    cfg = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=3, n_embd=24, n_kv_head=n_kv_head, position="rope")
    model = GPT(cfg).eval()
    state = model.setup_cache(1, 5)
    with torch.no_grad():
        model(torch.randint(0, 40, (1, 5)), state=state)
    assert kv_cache_bytes_per_token(cfg, 4) == 2 * 2 * n_kv_head * 8 * 4 == cache_bytes(state) // 5


@pytest.mark.parametrize("absorb", [False, True])
def test_gpt_with_mla_trains(absorb):
    torch.manual_seed(0)
    model = GPT(config("rope", q_lora_rank=8, absorb=absorb))
    idx = torch.randint(0, 40, (2, 12))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.transformer.h[0].attn.kv_up.weight.grad.abs().sum() > 0


def test_mla_follows_a_swapped_rope_position():
    torch.manual_seed(0)
    model = GPT(config("rope")).eval()
    seq = torch.randint(0, 40, (1, 20))
    with torch.no_grad():
        before = model(seq)[0]
        with_position(model, "yarn", scale=4.0)
        after = model(seq)[0]
    assert not torch.allclose(before, after)
    attn = model.transformer.h[0].attn
    assert attn._derived[0] is model.transformer.pos and attn._derived[2] > 1.0
    decode_matches_full(model, seq, prefill=6)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match=r"'kv_rank'.*kv_lora_rank"):
        MultiHeadLatentAttention(config(kv_rank=4))
    with pytest.raises(ValueError, match="'rope_head_dim' must be even"):
        MultiHeadLatentAttention(config(rope_head_dim=3))
    with pytest.raises(ValueError, match="'rope_theta' conflicts"):
        MultiHeadLatentAttention(config("rope", rope_theta=500.0))
    with pytest.raises(ValueError, match="absorb"):
        MultiHeadLatentAttention(config(absorb="yes"))
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(vocab_size=40, block_size=12, n_layer=1, n_head=4, n_kv_head=2, n_embd=16, attention="mla"))
