"""Quantized layers (quantization/linear.py, bnb.py): the kernels compute the layer their stored grid
stands for, within the rounding of their dtype; SmoothQuant's and LLM.int8()'s layers equal adl's
reference math (activation.py); nibble packing round-trips."""

import pytest
import torch
from torch import nn

from adl_cli.quantization import activation, grids
from adl_cli.quantization.bnb import Bnb4Linear, BnbInt8Linear
from adl_cli.quantization.linear import GridLinear, W8A8Linear, int8_per_token, pack_nibbles, unpack_nibbles

BF16 = 2.0 ** -8  # bf16's unit roundoff


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 6) and torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("grid, bits, group, kernel", [
    ("absmax", 8, 0, "int8"),  # torch's int8 kernel: one scale a row
    ("zero-point", 4, 32, "int4"),  # torch's int4 kernel, a float zero point
    ("absmax", 4, 64, "int4"),
    ("zero-point", 4, 16, None),  # no kernel for groups of 16: dequantized on the fly
    ("zero-point", 8, 32, None),
    ("nf4", 4, 32, None),
])
def test_grid_layers_compute_their_dequantized_weight(grid, bits, group, kernel):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)  # 40 rows: the int4 kernel's layout pads them to 48
    lin.weight.data[3, :16] *= 20  # an outlier group: its own scale
    w = lin.weight.detach()
    q = grids.nf4(w, group) if grid == "nf4" else grids.symmetric(w, bits, group) if grid == "absmax" else grids.asymmetric(w, bits, group)
    layer = GridLinear(q, lin.bias)
    assert layer._kernel == kernel
    wq = layer.dequantized()
    if grid != "nf4":  # a linear grid: within half a step of the float weight (scales stored as fp16: 2^-11 more)
        scale = layer.scale.float().repeat_interleave(group or 64, dim=1)
        assert torch.all((wq - w).abs() <= scale / 2 * (1 + 2.0 ** -10) + 2.0 ** -11 * w.abs())
    x = torch.randn(5, 7, 64)
    exact = nn.functional.linear(x, wq, lin.bias)
    # a kernel rounds its input, scales (and zero points) and output to bf16: 2^-8 relative each, so
    # 4 x 2^-8 of sum |x||w'| covers them; the dequantized path sums in fp32
    tol = (4 * BF16 if kernel else 1e-5) * (x.abs() @ wq.abs().T + lin.bias.abs()) + 1e-6
    assert torch.all((layer(x) - exact).abs() <= tol)


def test_awq_input_scales_are_folded_back():
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    s = torch.rand(64) + 0.5
    layer = GridLinear(grids.asymmetric(w * s, 4, 32), None, input_scale=s)
    x = torch.randn(3, 64)
    ref = (x / s) @ grids.asymmetric(w * s, 4, 32).dequantize().T
    tol = 4 * BF16 * ((x.abs() / s) @ layer.quantized().dequantize().abs().T) + 1e-6  # the int4 kernel's bf16 rounding
    assert torch.all((layer(x) - ref).abs() <= tol)
    deq = grids.asymmetric(w * s, 4, 32).dequantize()
    assert torch.allclose(layer.dequantized() * s, deq, rtol=2.0 ** -10, atol=1e-6)  # scales stored as fp16


def test_w8a8_layer_equals_smoothquant_reference_math():
    torch.manual_seed(2)
    w, x = torch.randn(48, 64), torch.randn(10, 64)
    x[:, 5] *= 30  # an outlier channel
    s = activation.smoothquant_scales(x.abs().amax(0), w, 0.5)
    qw, sw = int8_per_token(w * s)
    layer = W8A8Linear(qw, sw, s)
    ref = activation.smoothquant_w8a8(x, w, s)
    # the same integers; the layer's weight scales are stored as fp16 (2^-11 relative)
    assert torch.allclose(layer(x), ref, rtol=2.0 ** -10, atol=1e-5 * float(ref.abs().max()))


def test_bitsandbytes_layers_match_their_formats():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    x = torch.randn(4, 128)
    nf4 = Bnb4Linear.quantize(lin, quant_type="nf4", group_size=64, double_quant=False)
    ours = grids.nf4(lin.weight.detach(), 64).dequantize()
    assert torch.allclose(nf4.dequantized(), ours, atol=1e-6)  # adl's NF4 = bitsandbytes' NF4
    assert torch.allclose(nf4(x), nn.functional.linear(x, nf4.dequantized(), lin.bias), atol=1e-4)
    # double quantization stores the block absmaxes in 8 bits (plus a 256-value code: a large layer gains)
    big = nn.Linear(512, 256)
    single, dq = (Bnb4Linear.quantize(big, quant_type="nf4", group_size=64, double_quant=d) for d in (False, True))
    assert dq.storage_bits() < single.storage_bits()
    assert (dq.dequantized() - single.dequantized()).abs().max() < 0.02 * big.weight.abs().max()
    x[:, 7] = 20.0  # an outlier input column
    int8 = BnbInt8Linear.quantize(lin, threshold=6.0)
    ref = activation.llm_int8(x, int8.dequantized(), threshold=6.0) + lin.bias
    # bitsandbytes' CPU path casts the inputs to fp16 (2^-11 relative)
    assert torch.allclose(int8(x), ref, rtol=0, atol=4 * 2.0 ** -11 * float((x.abs() @ int8.dequantized().abs().T).max()))
