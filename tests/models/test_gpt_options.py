"""The GPT family's modern options, each against its formula or a property it must have."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adl_cli.errors import AdlError
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.nn.losses import fused_linear_cross_entropy

BASE = dict(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=32, position="rope")


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**BASE, **kw}))


def test_rmsnorm_and_the_mlp_variants_follow_their_formulas():
    m = gpt(norm="rmsnorm", mlp="swiglu")
    block = m.transformer.h[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.nn.init.normal_(block.ln_1.weight)
        want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * block.ln_1.weight
        torch.testing.assert_close(block.ln_1(x), want, atol=1e-5, rtol=1e-5)
        mlp = block.mlp
        torch.testing.assert_close(mlp(x), mlp.c_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
        assert mlp.gate_proj.out_features == 128  # 8/3 x 32 = 85.3, rounded up to a multiple of 64
        relu2 = gpt(mlp="relu2").transformer.h[0].mlp
        torch.testing.assert_close(relu2(x), relu2.c_proj(torch.relu(relu2.c_fc(x)) ** 2))


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    m = gpt(qk_norm=True, bias=False).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = m(idx)[0]
        for block in m.transformer.h:
            block.attn.q_proj.weight.mul_(50.0)
            block.attn.k_proj.weight.mul_(10.0)  # (scaling down would meet the norm's eps)
        torch.testing.assert_close(m(idx)[0], before, atol=2e-4, rtol=1e-4)
    plain = gpt(bias=False).eval()
    with torch.no_grad():
        for block in plain.transformer.h:
            block.attn.q_proj.weight.mul_(50.0)
        assert (plain(idx)[0] - gpt(bias=False).eval()(idx)[0]).abs().max() > 1e-2  # without it, the scale matters


def test_untied_embeddings_are_two_tensors_that_save_and_load(tmp_path):
    from adl_cli.runs import load_run, save_run

    m = gpt(tie_embeddings=False)
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert m.num_params(non_embedding=False) == gpt().num_params(non_embedding=False) + 50 * 32
    save_run(tmp_path, m)
    idx = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_run(tmp_path).model(idx)[0], m.eval()(idx)[0])


def test_zero_initialised_projections_start_every_block_as_the_identity():
    m = gpt(zero_init_proj=True, position="learned").eval()
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        tr = m.transformer
        x = tr.wte(idx) + tr.pos.embed(torch.arange(8))
        torch.testing.assert_close(m(idx)[0], m.lm_head(tr.ln_f(x)))


@pytest.mark.parametrize("chunk", [0, 3])
def test_soft_capped_logits_and_their_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    y = torch.randint(0, 20, (10,))
    y[2] = -100
    z = 3.0 * torch.tanh(h @ w.T / 3.0)
    ref = F.cross_entropy(z, y, ignore_index=-100)
    gh, gw = torch.autograd.grad(ref, (h, w))
    if chunk:
        got = fused_linear_cross_entropy(h, w, y, chunk_rows=chunk, softcap=3.0)
        gh2, gw2 = torch.autograd.grad(got, (h, w))
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(gh2, gh)
        torch.testing.assert_close(gw2, gw)
    m = gpt(logit_softcap=5.0, loss_chunk_rows=chunk).eval()
    with torch.no_grad():
        logits = m(torch.randint(0, 50, (1, 8)))[0]
    assert logits.abs().max() < 5.0


def test_unet_skips_with_zero_weights_are_the_plain_model_and_learn():
    plain, skips = gpt(), gpt(unet_skips=True)
    skips.load_state_dict({**plain.state_dict(), "skip_weights": torch.zeros(2)})
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(skips.eval()(idx)[0], plain.eval()(idx)[0])
    skips.train()
    skips(idx[:, :-1], idx[:, 1:])[1].backward()
    assert skips.skip_weights.grad.abs().sum() > 0


def test_multi_token_prediction_adds_its_heads_loss_in_training_only():
    m = gpt(mtp_heads=2, mtp_weight=0.5, dropout=0.0)
    idx = torch.randint(0, 50, (2, 13))
    x, y = idx[:, :-1], idx[:, 1:]
    m.train()
    total = m(x, y)[1]
    h, trunk = m._hidden(x)
    main = F.cross_entropy(m.lm_head(h).flatten(0, 1), y.flatten())
    aux = []
    pos = torch.arange(12)
    for d, head in enumerate(m.mtp, start=1):
        hd = m.transformer.ln_f(head(trunk, pos, m.transformer.pos))
        aux.append(F.cross_entropy(m.lm_head(hd[:, : 12 - d]).flatten(0, 1), y[:, d:].flatten()))  # token t + 1 + d
    torch.testing.assert_close(total, main + 0.5 * torch.stack(aux).mean(), atol=1e-5, rtol=1e-5)
    assert set(m.aux_metrics) == {"next_token_loss", "mtp_loss"}
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x, y)[1], main.detach(), atol=1e-5, rtol=1e-5)  # evaluation: the next token only


def test_every_option_at_once_decodes_like_full_recompute_and_is_not_exported_as_gpt2():
    from adl_cli.models import hf_gpt2

    cfg = dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, zero_init_proj=False, logit_softcap=10.0,
               unet_skips=True, mtp_heads=1, n_kv_head=1)
    m = gpt(**cfg).eval()
    seq = torch.randint(0, 50, (2, 14))
    with torch.no_grad():
        full = m(seq)[0]
        state = m.setup_cache(2, 14)
        steps = [m(seq[:, :5], state=state)[0]] + [m(seq[:, t:t + 1], state=state)[0] for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)
    with pytest.raises(AdlError, match="norm='rmsnorm'.*GPT-2"):
        hf_gpt2.check_exportable(dataclasses.replace(m.config, position="learned", n_kv_head=None))


def test_bad_option_values_are_refused_by_name():
    with pytest.raises(ValueError, match="model.norm 'rmsnrom' is unknown.*did you mean 'rmsnorm'"):
        GPTConfig(norm="rmsnrom")
    with pytest.raises(ValueError, match="model.mlp"):
        GPTConfig(mlp="geglu")
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=-1.0)
