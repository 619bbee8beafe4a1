import math

import pytest
import torch
import torch.nn.functional as F

from adl_cli.models.gpt import GPT, GPTConfig


def tiny(**kw):
    cfg = dict(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_init_loss_is_log_vocab():
    m = tiny(vocab_size=512, n_embd=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (8, 24), generator=g)
    y = torch.randint(0, 512, (8, 24), generator=g)
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(512)) < 0.05


def test_fused_loss_equals_plain_logits_loss_and_grads():
    m = tiny()
    x = torch.randint(0, 97, (3, 24))
    y = torch.randint(0, 97, (3, 24))
    m.config.loss_chunk_rows = 10
    _, fused = m(x, y)
    g_fused = torch.autograd.grad(fused, list(m.parameters()))
    logits, _ = m(x)
    plain = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    g_plain = torch.autograd.grad(plain, list(m.parameters()))
    assert torch.allclose(fused, plain, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_naive_and_sdpa_models_agree():
    x = torch.randint(0, 97, (2, 24))
    a, _ = tiny(attention="naive")(x)
    b, _ = tiny(attention="sdpa")(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_gpt2_init_scales_residual_projections():
    m = tiny(n_layer=8, n_embd=64)
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_decoding_equals_full_recompute(position):
    m = tiny(position=position, n_kv_head=2).eval()
    x = torch.randint(0, 97, (2, 24))
    full, _ = m(x)
    state = m.setup_cache(2, 24)
    first, _ = m(x[:, :10], state=state)
    steps = [first[:, -1]]
    for t in range(10, 24):
        out, _ = m(x[:, t : t + 1], state=state)
        steps.append(out[:, -1])
    assert torch.allclose(full[:, 9:], torch.stack(steps, 1), atol=1e-5)


def test_a_few_steps_lower_the_loss():
    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 24))
    first = None
    for _ in range(15):
        _, loss = m(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_learned_positions_refuse_long_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.zeros(1, 25, dtype=torch.long))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="multiple of model.n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(Exception, match="did you mean"):
        GPTConfig(attention="sdpaa")
