"""The decoding layout: transposed weights give the model's outputs, and a tied table stays one tensor."""

import pytest
import torch

from adl_cli.inference.engine import generate_batch
from adl_cli.inference.layout import DecodeEmbedding, DecodeLinear, decode_layout
from adl_cli.inference.quant import QuantLinear, quantize_model
from adl_cli.models.gpt import GPT, GPTConfig


def _bytes(model):
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("tied, attention", [(True, "sdpa"), (False, "sdpa"), (True, "mla")])
def test_the_decoding_layout_gives_the_same_logits_and_tokens(tied, attention):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, tie_embeddings=tied, attention=attention,
                      position="rope")).eval()
    d = GPT(m.config).eval()
    d.load_state_dict(m.state_dict())
    before = _bytes(d)
    n = decode_layout(d)
    assert n == sum(isinstance(x, torch.nn.Linear) for x in m.modules()) and not any(type(x) is torch.nn.Linear for x in d.modules())
    assert _bytes(d) == before  # replaced, not duplicated: a tied table is still one tensor
    assert isinstance(d.transformer.wte, DecodeEmbedding) == tied and isinstance(d.lm_head, DecodeLinear)
    x = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        # the same products summed in another order at most: fp32 rounding of 64-term sums
        torch.testing.assert_close(d(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
    assert [c.tokens for c in generate_batch(d, x.tolist(), 8)] == [c.tokens for c in generate_batch(m, x.tolist(), 8)]


def test_quantized_layers_are_left_as_they_are():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=64)).eval()
    quantize_model(m, "int8")
    assert decode_layout(m) == 0 and isinstance(m.lm_head, QuantLinear)
