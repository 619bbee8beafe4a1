"""Recurrent language models: the fused and the written-out paths are one function of the same
weights (values and gradients); decoding from the recurrent state equals the full forward;
left-padded batches equal each prompt alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adl_cli.models import build_model
from adl_cli.models.rnn import RNNConfig

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


def _model(cell, impl="fast"):
    torch.manual_seed(0)
    return build_model(RNNConfig(cell=cell, impl=impl, n_layer=2, n_embd=12, block_size=32).with_vocab(30)).eval()


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_fast_and_teaching_paths_are_one_function(cell):
    fast = _model(cell)
    teaching = build_model(dataclasses.replace(fast.config, impl="teaching")).eval()
    teaching.load_state_dict(fast.state_dict())
    idx, y = torch.randint(0, 30, (2, 15)), torch.randint(0, 30, (2, 15))
    torch.testing.assert_close(teaching(idx)[0], fast(idx)[0], **TOL)
    grads = [torch.autograd.grad(m(idx, y)[1], m.cells[0].weight_hh)[0] for m in (fast, teaching)]
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_decoding_equals_the_full_forward_and_padding_is_exact(cell):
    from adl_cli.inference.engine import generate_batch

    model = _model(cell)
    idx = torch.randint(0, 30, (1, 14))
    full = model(idx)[0]
    state = model.setup_cache(1)
    size = state.nbytes()  # before the first step allocates it
    h = model.hidden(idx[:, :5], state)
    torch.testing.assert_close(model.logits(h), full[:, :5], **TOL)
    for t in range(5, 14):
        h = model.hidden(idx[:, t:t + 1], state)
        torch.testing.assert_close(model.logits(h[:, -1]), full[:, t], **TOL)
    held = [t for s in state.layers for t in (s if isinstance(s, tuple) else (s,))]
    assert size == sum(t.numel() * t.element_size() for t in held) > 0
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10]]
    together = generate_batch(model, prompts, 8)
    for p, row in zip(prompts, together):
        assert generate_batch(model, [p], 8)[0].tokens == row.tokens
