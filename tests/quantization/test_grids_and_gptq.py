"""Quantization grids and GPTQ: rounding moves a weight by at most half a step, 0 stays exact on
the zero-point grid, adl's NF4 codebook and blockwise NF4 are bitsandbytes', GPTQ equals
round-to-nearest when the inputs are uncorrelated and beats it on correlated calibration data."""

from __future__ import annotations

import pytest
import torch

from adl_cli.quantization.grids import asymmetric, nf4, nf4_codebook, symmetric
from adl_cli.quantization.gptq import Hessian, gptq


def _weights(out=48, width=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, width, generator=g) * torch.rand(out, 1, generator=g)


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 64), (4, 32), (4, 128)])
def test_symmetric_rounding_moves_a_weight_by_at_most_half_a_step(bits, group):
    w = _weights()
    q = symmetric(w, bits, group)
    err = (q.dequantize() - w).abs().view(w.shape[0], -1, group or w.shape[1])
    assert (err <= q.scale[..., None] / 2 * (1 + 1e-6)).all()
    assert q.q.abs().max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (3, 64), (8, 0)])
def test_the_zero_point_grid_keeps_zero_exact_and_rounds_within_half_a_step(bits, group):
    w = _weights()
    w[:, :5] = 0.0
    q = asymmetric(w, bits, group)
    deq = q.dequantize()
    err = (deq - w).abs().view(w.shape[0], -1, group or w.shape[1])
    assert (err <= q.scale[..., None] / 2 * (1 + 1e-5)).all()
    assert (deq[:, :5] == 0).all() and int(q.q.max()) <= 2 ** bits - 1


def test_a_group_size_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        symmetric(_weights(width=100), 4, 64)


def test_the_nf4_codebook_and_blockwise_nf4_are_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    theirs = bnbf.get_4bit_type("nf4", device="cpu").float()
    assert torch.allclose(nf4_codebook(), theirs, atol=1e-6)
    w = _weights(out=32, width=128)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state).float()
    mine = nf4(w, 64).dequantize()
    same = (mine - ref).abs() <= 1e-5 * w.abs().amax()
    assert same.float().mean() > 0.999, (mine - ref).abs().max()  # a tie between two codes may round either way


def _calibration(width=256, n=2048, seed=1):
    """Inputs with strongly correlated features (a low-rank mixing plus noise), as activations are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) @ torch.randn(16, width, generator=g) + 0.1 * torch.randn(n, width, generator=g)


def _output_error(w, deq, x):
    return float(((x @ w.T - x @ deq.T) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_its_calibration_data(act_order):
    w, x = _weights(), _calibration()
    h = Hessian(w.shape[1])
    for chunk in x.split(500):
        h.add(chunk)
    rtn = asymmetric(w, 4, 64).dequantize()
    q = gptq(w, h.h, bits=4, group_size=64, block=32, act_order=act_order)
    assert q.q.max() <= 15 and q.scale.shape == (48, 4)
    assert _output_error(w, q.dequantize(), x) < 0.5 * _output_error(w, rtn, x)


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest():
    """H = c I: the inverse Hessian has no off-diagonal terms, so no error is fed forward."""
    w = _weights()
    q = gptq(w, 3.0 * torch.eye(w.shape[1]), bits=4, group_size=64, block=32)
    assert torch.equal(q.q, asymmetric(w, 4, 64).q)


def test_the_running_hessian_is_two_x_transpose_x_over_n_and_unseen_inputs_get_weight_zero():
    x = _calibration(width=32, n=300)
    h = Hessian(32)
    h.add(x[:100])
    h.add(x[100:])
    assert torch.allclose(h.h, 2 * x.double().T @ x.double() / 300, rtol=1e-10)
    x[:, 3] = 0.0
    h = Hessian(32)
    h.add(x)
    q = gptq(_weights(out=8, width=32), h.h, bits=4, group_size=0, block=8)
    assert (q.dequantize()[:, 3] == 0).all()
    with pytest.raises(ValueError, match="reads 64 inputs"):
        gptq(_weights(out=8, width=64), h.h, group_size=0)


def test_hqq_zero_points_lower_the_lp_rounding_error_of_the_min_max_grid():
    from adl_cli.quantization.grids import hqq

    w = _weights(seed=3)
    rtn, fit = asymmetric(w, 4, 64), hqq(w, 4, 64, p=0.7)
    lp = lambda q: float(((q.dequantize() - w).abs() ** 0.7).sum())  # noqa: E731
    assert torch.equal(fit.scale, rtn.scale) and fit.q.max() <= 15
    l2 = lambda q: float(((q.dequantize() - w) ** 2).sum())  # noqa: E731
    assert lp(fit) < 0.99 * lp(rtn) and l2(fit) < 0.97 * l2(rtn)  # measured: 0.96-0.97 and 0.92-0.93 over 4 seeds
