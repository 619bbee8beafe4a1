"""The causal depthwise convolution equals nn.Conv1d (depthwise, left-padded) with the same
parameters, values and gradients; continued from its state it equals one pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adl_cli.nn.causal_conv import CausalConv

TOL = dict(atol=1e-12, rtol=1e-12)  # float64, k-term sums


@pytest.mark.parametrize("taps", [1, 2, 4])
def test_equals_torch_conv1d(taps):
    torch.manual_seed(0)
    conv = CausalConv(6, taps).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    y, _ = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (taps - 1, 0)), conv.weight, conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref, **TOL)
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (x, conv.weight, conv.bias))
    want = torch.autograd.grad((ref * w).sum(), (x, conv.weight, conv.bias))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL)


def test_continued_from_its_state_equals_one_pass():
    torch.manual_seed(0)
    conv = CausalConv(5, 4).double()
    x = torch.randn(3, 13, 5, dtype=torch.float64)
    whole, last = conv(x)
    first, state = conv(x[:, :6])
    parts = [first]
    for t in range(6, 13):  # one step at a time, as decoding does
        y, state = conv(x[:, t:t + 1], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, **TOL)
    torch.testing.assert_close(state, last, **TOL)
    assert last.shape == (3, 3, 5)
