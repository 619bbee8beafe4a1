"""Recurrences in float32 whatever autocast says.

A state-space or recurrent cell multiplies decays and exponentials over many steps: in bfloat16
(8 bits of mantissa) the products drift, and on a CPU the elementwise bfloat16 kernels are slower
than float32 ones too. ``in_float32(fn, *args)`` runs ``fn`` with autocast off and its floating
inputs in float32 (tensors, and tensors inside tuples: a decode state), and returns its first
output in the first input's dtype (the rest, a state, stays float32). float64 is left as it is. Mamba's and Mamba-2's scans
and xLSTM's cells run through it, as the authors' kernels keep the scan in float32.
"""

from __future__ import annotations

import torch


def _up(value):
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value  # float64 stays
    if isinstance(value, tuple):
        return tuple(_up(v) for v in value)
    return value


def in_float32(fn, *args, **kwargs):
    first = next(a for a in args if torch.is_tensor(a))
    with torch.autocast(first.device.type, enabled=False):
        out = fn(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})
    if isinstance(out, tuple):
        return (out[0].to(first.dtype), *out[1:])
    return out.to(first.dtype)
