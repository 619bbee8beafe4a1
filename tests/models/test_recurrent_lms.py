"""The recurrent language-model families (Mamba, Mamba-2, mLSTM, sLSTM): causal; each family's
forms give one model (Mamba's three scans, Mamba-2's three SSD forms, the mLSTM's three forms);
decoding step by step from the recurrent state equals the full forward (the state's size
independent of the length); left-padded batches equal each prompt alone. (The RNNs: test_rnn_lm.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adl_cli.models import build_model
from adl_cli.models.mamba import MambaConfig
from adl_cli.models.mamba2 import Mamba2Config
from adl_cli.models.xlstm import XLSTMConfig

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


CONFIGS = {"mamba": MambaConfig(n_layer=2, n_embd=16, d_state=4, block_size=32, scan_chunk=8),
           "mamba2": Mamba2Config(n_layer=2, n_embd=16, d_state=4, headdim=8, block_size=32, ssd_chunk=8),
           "mlstm": XLSTMConfig(family="mlstm", n_layer=2, n_embd=16, n_head=2, block_size=32, chunk=8),
           "slstm": XLSTMConfig(family="slstm", n_layer=2, n_embd=16, n_head=2, block_size=32)}
OTHER_FORMS = {"mamba": ("scan", ("sequential", "parallel")), "mamba2": ("ssd", ("recurrent", "quadratic")),
               "mlstm": ("form", ("parallel", "recurrent")), "slstm": ("form", ())}  # an sLSTM has only its loop


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return build_model(CONFIGS[request.param].with_vocab(40)).eval()


def test_causal_and_the_forms_agree(model):
    idx = torch.randint(0, 40, (2, 21))
    logits = model(idx)[0]
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 40
    other = model(changed)[0]
    torch.testing.assert_close(other[:, :12], logits[:, :12], **TOL)
    assert not torch.allclose(other[:, 12:], logits[:, 12:])
    key, forms = OTHER_FORMS[model.config.family]
    for form in forms:
        twin = build_model(dataclasses.replace(model.config, **{key: form})).eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(twin(idx)[0], logits, **TOL)


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
