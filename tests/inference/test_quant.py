"""Weight-only int8 / int4: round to nearest within half a scale, outputs within the bound that
follows from it, the packed layout, and a quantized GPT decoding."""

import pytest
import torch
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.inference.quant import QuantLinear, quantize_model
from adl_cli.methods.generate import generate
from adl_cli.models.gpt import GPT, GPTConfig


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (4, 16)])
def test_rounding_moves_each_weight_at_most_half_a_scale_and_outputs_stay_in_bound(bits, group):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)  # 40 rows: the int4 kernel's layout pads them to 48
    lin.weight.data[3, :16] *= 20  # an outlier row / group: its own scale
    q = QuantLinear(lin, bits, group)
    w = lin.weight.detach()
    g = q.group_size
    scale = q.scale.repeat_interleave(g, dim=1)  # (out, in): each weight's scale
    assert torch.all((q.dequantized() - w).abs() <= scale / 2 * (1 + 1e-6))
    assert q.int_weight().abs().max() <= (127 if bits == 8 else 7)
    x = torch.randn(5, 7, 64)
    y, ref = q(x), lin(x)
    wq = q.dequantized()
    # weight rounding (half a scale each), then for int8's bf16 kernel: the input, the scales and the
    # output rounded to bf16 (2^-8 relative each at most, so 3 x 2^-8 of sum |x||w| covers them); fp32 sums
    kernel = 3 * 2.0 ** -8 if bits == 8 or q.int4_kernel else 1e-5
    assert q.int4_kernel == (bits == 4 and group == 32)  # torch's int4 kernel takes groups of 32 to 256
    bound = (x.abs() @ (scale / 2).T) * (1 + 1e-5) + kernel * (x.abs() @ wq.abs().T) + 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert torch.all((y - ref).abs() <= bound)
    exact = nn.functional.linear(x, wq, lin.bias)  # the kernel computes the dequantized layer, up to its bf16 rounding
    assert torch.all((y - exact).abs() <= kernel * (x.abs() @ wq.abs().T + lin.bias.abs()) + 1e-5)
    stored = q.qweight.numel() * q.qweight.element_size()
    assert stored == 64 * (40 if bits == 8 or not q.int4_kernel else 48) * bits // 8


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
        # Gaussian weights) or max/7 over 32: about 0.7% and 10% of each layer's output; bounds 2.5x that
        assert err < worst, (scheme, err)
        out = generate(qm, x[:1, :4], 8, temperature=0)
        assert out.shape == (1, 12)
    tied = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=64, tie_embeddings=True)).eval()
    table = tied.transformer.wte.weight.detach().clone()
    quantize_model(tied, "int8")
    assert isinstance(tied.lm_head, QuantLinear) and torch.equal(tied.transformer.wte.weight, table)  # the head: a quantized copy
    assert tied.transformer.wte.weight.dtype == torch.float32  # the embedding keeps its float table


def test_models_it_cannot_quantize_are_clear_errors():
    with pytest.raises(AdlError, match="quant must be one of int8, int4"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")
    with pytest.raises(AdlError, match="no linear layers"):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(AdlError, match="multiple of the group size"):
        quantize_model(nn.Sequential(nn.Linear(40, 4)), "int4")
