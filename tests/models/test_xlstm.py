"""xLSTM as language models (mlstm, slstm): causal; the sLSTM's outputs unchanged by its
stabiliser; the mLSTM's three forms give one model; decoding step by step from the recurrent
state equals the full forward (a state of constant size); left-padded batches equal each prompt
alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adl_cli.models import build_model
from adl_cli.models.xlstm import XLSTMConfig

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


def _build(family, **kw):
    torch.manual_seed(0)
    cfg = XLSTMConfig(family=family, n_layer=2, n_embd=16, n_head=2, block_size=32, chunk=8, **kw)
    return build_model(cfg.with_vocab(40)).eval()


@pytest.fixture(params=["mlstm", "slstm"])
def model(request):
    return _build(request.param)


def test_causal(model):
    idx = torch.randint(0, 40, (2, 20))
    logits = model(idx)[0]
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 40
    other = model(changed)[0]
    torch.testing.assert_close(other[:, :12], logits[:, :12], **TOL)
    assert not torch.allclose(other[:, 12:], logits[:, 12:])


def test_the_mlstm_forms_give_one_model():
    model = _build("mlstm")
    idx = torch.randint(0, 40, (2, 21))
    logits = model(idx)[0]
    for form in ("parallel", "recurrent"):
        twin = build_model(dataclasses.replace(model.config, form=form)).eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(twin(idx)[0], logits, **TOL)


def test_the_slstm_stabiliser_changes_no_output():
    """float64: the raw exponential gates (no stabiliser) give the same outputs."""
    model = _build("slstm").double()
    with torch.no_grad():  # large input-gate pre-activations: the stabiliser is doing work
        for block in model.blocks:
            block.W.bias.view(4, -1)[1].fill_(30.0)
    raw = build_model(dataclasses.replace(model.config, stabilise=False)).double().eval()
    raw.load_state_dict(model.state_dict())
    idx = torch.randint(0, 40, (2, 20))
    torch.testing.assert_close(raw(idx)[0], model(idx)[0], atol=1e-10, rtol=1e-10)


def test_recurrent_decoding_equals_the_full_forward(model):
    idx = torch.randint(0, 40, (1, 18))
    full = model(idx)[0]
    state = model.setup_cache(1)
    size = state.nbytes()
    h = model.hidden(idx[:, :7], state)
    torch.testing.assert_close(model.logits(h), full[:, :7], **TOL)
    for t in range(7, 18):
        h = model.hidden(idx[:, t:t + 1], state)
        torch.testing.assert_close(model.logits(h[:, -1]), full[:, t], **TOL)
    assert state.nbytes() == size  # a constant-size state, not a cache that grows


def test_left_padded_batches_equal_each_prompt_alone(model):
    from adl_cli.inference.engine import generate_batch

    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11]]
    together = generate_batch(model, prompts, 10)
    for p, row in zip(prompts, together):
        assert generate_batch(model, [p], 10)[0].tokens == row.tokens


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_head"):
        XLSTMConfig(family="mlstm", n_embd=16, expand=2, n_head=5)
    with pytest.raises(ValueError, match="mlstm or slstm"):
        XLSTMConfig(family="gru")
