"""The written-out RNN, GRU and LSTM cells equal torch's fused layers with the same weights,
outputs and final states and gradients, and continuing from a state equals one pass."""

from __future__ import annotations

import pytest
import torch

from adl_cli.nn.recurrent import RecurrentCell, copy_to_torch, torch_layer


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_each_cell_equals_torchs_layer(kind):
    torch.manual_seed(0)
    cell = RecurrentCell(kind, 5, 7).double()
    ref = torch_layer(kind, 5, 7).double()
    copy_to_torch(cell, ref)
    x = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=True)
    out, state = cell(x)
    ref_out, ref_state = ref(x)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    if kind == "lstm":
        torch.testing.assert_close(state[0], ref_state[0][0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(state[1], ref_state[1][0], atol=1e-12, rtol=1e-10)
    else:
        torch.testing.assert_close(state, ref_state[0], atol=1e-12, rtol=1e-10)
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (ref_g,) = torch.autograd.grad((ref_out * w).sum(), x)
    torch.testing.assert_close(g, ref_g, atol=1e-12, rtol=1e-10)
    # one pass = two passes, the second from the first's state (the decode path)
    first, mid = cell(x[:, :4])
    second, _ = cell(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), out, atol=1e-12, rtol=1e-10)


def test_an_unknown_cell_is_a_value_error():
    with pytest.raises(ValueError, match="rnn, gru, lstm"):
        RecurrentCell("elman", 2, 2)
