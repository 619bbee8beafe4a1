"""``--quant int8|int4``: a float model's linear layers quantized at load (quantization/linear.py's
layers, round to nearest, the head included), decoding close to the float model."""

import pytest
import torch
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.inference.quant import quantize_model
from adl_cli.methods.generate import generate
from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.quantization.linear import GridLinear


def test_a_quantized_gpt_decodes_close_to_the_float_one():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, tie_embeddings=False)).eval()
    x = torch.randint(0, 64, (2, 16))
    ref = m(x)[0]
    for scheme, worst in (("int8", 0.02), ("int4", 0.3)):
        qm = GPT(m.config).eval()
        qm.load_state_dict(m.state_dict())
        n = quantize_model(qm, scheme)
        assert n == 2 * 4 + 2 * 2 + 1  # q/k/v/out and the two MLP layers in each block, and the head
        err = (qm(x)[0] - ref).norm() / ref.norm()
        # rounding error is uniform in +-s/2 (std s/sqrt 12) with s = max/127 (about 3 sigma / 127 over 64
        # Gaussian weights) or (max - min)/15 over 32: about 0.7% and 5% of each layer's output; bounds 2.5x+
        assert err < worst, (scheme, err)
        out = generate(qm, x[:1, :4], 8, temperature=0)
        assert out.shape == (1, 12)
        with pytest.raises(AdlError, match="already quantized"):
            quantize_model(qm, scheme)
    tied = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=64, tie_embeddings=True)).eval()
    table = tied.transformer.wte.weight.detach().clone()
    quantize_model(tied, "int8")
    assert isinstance(tied.lm_head, GridLinear) and torch.equal(tied.transformer.wte.weight, table)  # the head: a quantized copy
    assert tied.transformer.wte.weight.dtype == torch.float32  # the embedding keeps its float table


def test_models_it_cannot_quantize_are_clear_errors():
    with pytest.raises(AdlError, match="quant must be one of int8, int4"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")
    with pytest.raises(AdlError, match="no linear layers"):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(AdlError, match="group_size 32 does not divide the input width 40"):
        quantize_model(nn.Sequential(nn.Linear(40, 4)), "int4")
