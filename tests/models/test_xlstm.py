"""xLSTM's own properties (the shared ones: test_recurrent_lms.py): the sLSTM's outputs are
unchanged by its stabiliser; a config the families cannot build is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adl_cli.errors import AdlError
from adl_cli.models import build_model
from adl_cli.models.xlstm import XLSTMConfig


def test_the_slstm_stabiliser_changes_no_output():
    """float64: the raw exponential gates (no stabiliser) give the same outputs."""
    torch.manual_seed(0)
    model = build_model(XLSTMConfig(family="slstm", n_layer=2, n_embd=16, n_head=2, block_size=32).with_vocab(40)).double().eval()
    with torch.no_grad():  # large input-gate pre-activations: the stabiliser is doing work
        for block in model.blocks:
            block.W.bias.view(4, -1)[1].fill_(30.0)
    raw = build_model(dataclasses.replace(model.config, stabilise=False)).double().eval()
    raw.load_state_dict(model.state_dict())
    idx = torch.randint(0, 40, (2, 20))
    torch.testing.assert_close(raw(idx)[0], model(idx)[0], atol=1e-10, rtol=1e-10)


def test_a_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_head"):
        XLSTMConfig(family="mlstm", n_embd=16, expand=2, n_head=5)
    with pytest.raises(ValueError, match="mlstm or slstm"):
        XLSTMConfig(family="gru")
    with pytest.raises(AdlError, match="vocab_size is set from the tokenizer"):
        build_model(XLSTMConfig(family="slstm", n_embd=16, n_head=2))
