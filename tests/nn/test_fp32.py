"""in_float32: a recurrence sees float32 inputs with autocast off (its matmuls too), gives its
output back in the caller's dtype and its state in float32; float64 is left alone."""

from __future__ import annotations

import torch

from adl_cli.nn.fp32 import in_float32


def _cell(x, state, w):
    seen = (x.dtype, state[0].dtype, (x @ w).dtype)  # a matmul under autocast would be bf16
    return x @ w, (state[0] * 2,), seen


def test_inside_float32_outside_the_callers_dtype():
    x, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 4)
    state = (torch.randn(3, dtype=torch.bfloat16),)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, new_state, seen = in_float32(_cell, x, state, w)
    assert seen == (torch.float32, torch.float32, torch.float32)
    assert y.dtype == torch.bfloat16 and new_state[0].dtype == torch.float32
    torch.testing.assert_close(y.float(), x.float() @ w, atol=0.05, rtol=0.02)  # only the result's bf16 rounding


def test_float64_stays_float64():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    y, _, seen = in_float32(_cell, x, (torch.zeros(3, dtype=torch.float64),), w)
    assert seen == (torch.float64,) * 3 and y.dtype == torch.float64
