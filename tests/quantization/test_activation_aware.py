"""SmoothQuant, AWQ and LLM.int8(): the scalings leave the layer's function unchanged before
rounding, and each beats plain rounding where its method says it should (activation outlier
channels for SmoothQuant and LLM.int8(), salient input channels for AWQ)."""

from __future__ import annotations

import pytest
import torch

from torch import nn

from adl_cli.quantization.activation import BlockProbe, awq_block_scales, awq_scales, llm_int8, smoothquant_scales, smoothquant_w8a8, w8a8
from adl_cli.quantization.grids import asymmetric


def _layer(seed=0, n=512, width=256, out=64, outliers=(3, 77, 140), size=40.0):
    """Activations with a few outlier channels (as trained transformers have) and a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=torch.float64)
    x[:, list(outliers)] *= size
    w = torch.randn(out, width, generator=g, dtype=torch.float64) / width ** 0.5
    return x, w


def _err(y, x, w):
    return float((y - x @ w.T).pow(2).sum())


def test_smoothing_leaves_the_layer_unchanged_before_rounding_and_helps_w8a8():
    x, w = _layer()
    s = smoothquant_scales(x.abs().amax(0), w, alpha=0.5).double()
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-12)
    assert _err(smoothquant_w8a8(x, w, s), x, w) < 0.5 * _err(w8a8(x, w), x, w)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(x.abs().amax(0), w, alpha=1.5)


def test_llm_int8_keeps_outlier_channels_in_floating_point():
    x, w = _layer(size=60.0)
    assert _err(llm_int8(x, w, threshold=6.0), x, w) < 0.1 * _err(w8a8(x, w), x, w)
    calm, _ = _layer(outliers=())
    assert torch.equal(llm_int8(calm, w, threshold=1e9), w8a8(calm, w))  # no outliers: plain int8


def test_awq_scaling_is_exact_before_rounding_and_beats_round_to_nearest_on_salient_channels():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g)
    x[:, :8] *= 20.0  # salient inputs: their weights' rounding errors cost the most
    w = torch.randn(64, 256, generator=g) / 16
    s, alpha = awq_scales(x, w, bits=4, group_size=64)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    rtn = _err(x.double() @ asymmetric(w, 4, 64).dequantize().double().T, x.double(), w.double())
    awq = _err((x / s).double() @ asymmetric(w * s, 4, 64).dequantize().double().T, x.double(), w.double())
    assert alpha > 0 and awq < 0.8 * rtn


def test_awq_block_objective_scores_the_modules_output_and_beats_round_to_nearest_there():
    """A GELU MLP whose first layer reads salient inputs: the scale searched on the MLP's output (the
    error passing through the activation and the second layer) gives a smaller output error than
    round-to-nearest, the probe restores the float weights, and float weights score 0."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    x = torch.randn(4, 64, 128)
    x[..., :6] *= 25.0
    before = mlp[0].weight.detach().clone()
    probe = BlockProbe(mlp, [mlp[0]], [((x,), {})])
    assert probe.error([before]) == 0.0
    s, alpha = awq_block_scales(probe, x.reshape(-1, 128), bits=4, group_size=64)
    assert torch.equal(mlp[0].weight, before)  # the search leaves the module as it found it
    rtn = probe.error([asymmetric(before, 4, 64).dequantize()])
    awq = probe.error([asymmetric(before * s, 4, 64).dequantize() / s])
    assert alpha > 0 and awq < 0.8 * rtn
