"""Mamba-2's SSD: the chunked form equals the recurrence and the quadratic (attention-like) form,
values and gradients, in float64; continued from a state it equals one pass over the whole."""

from __future__ import annotations

import pytest
import torch

from adl_cli.nn.ssd import segment_sums, ssd

TOL = dict(atol=1e-10, rtol=1e-10)  # float64; sums of at most a few hundred terms


def _inputs(length=29, heads=3, p=4, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    x = torch.randn(2, length, heads, p, **f)
    dt = torch.nn.functional.softplus(torch.randn(2, length, heads, **f))
    A = -torch.rand(heads, **f) * 2 - 0.1
    B, C = torch.randn(2, length, n, **f), torch.randn(2, length, n, **f)
    h0 = torch.randn(2, heads, p, n, **f)
    return [t.requires_grad_() for t in (x, dt, A, B, C, h0)]


def test_segment_sums_are_the_sums_between_positions():
    la = torch.randn(7, dtype=torch.float64)
    got = segment_sums(la)
    for t in range(7):
        for s in range(7):
            want = la[s + 1:t + 1].sum() if s <= t else torch.tensor(float("-inf"), dtype=torch.float64)
            torch.testing.assert_close(got[t, s], want, **TOL)


@pytest.mark.parametrize("form,chunk", [("quadratic", 0), ("chunked", 8), ("chunked", 5), ("chunked", 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_and_quadratic_forms_equal_the_recurrence_forward_and_backward(form, chunk, with_state):
    x, dt, A, B, C, h0 = _inputs()
    h0 = h0 if with_state else None
    ref_y, ref_h = ssd(x, dt, A, B, C, h0, form="recurrent")
    y, h = ssd(x, dt, A, B, C, h0, form=form, chunk=chunk or 32)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)
    leaves = [t for t in (x, dt, A, B, C, h0) if t is not None]
    w = torch.randn_like(ref_y)
    ref_grads = torch.autograd.grad((ref_y * w).sum() + ref_h.square().sum(), leaves)
    grads = torch.autograd.grad((y * w).sum() + h.square().sum(), leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("form", ["recurrent", "quadratic", "chunked"])
def test_a_pass_continued_from_its_state_equals_one_pass(form):
    x, dt, A, B, C, _ = [t.detach() for t in _inputs(length=20)]
    whole, last = ssd(x, dt, A, B, C, form=form, chunk=6)
    first, mid = ssd(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], form=form, chunk=6)
    second, end = ssd(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], mid, form=form, chunk=6)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, **TOL)
    torch.testing.assert_close(end, last, **TOL)


def test_zero_steps_leave_the_state_alone():
    """dt = 0 (a left-padded position): a = 1 and no input, so the state passes unchanged."""
    x, dt, A, B, C, h0 = [t.detach() for t in _inputs(length=6)]
    dt = dt.clone()
    dt[:, :3] = 0
    _, with_zeros = ssd(x, dt, A, B, C, h0, form="chunked", chunk=4)
    _, without = ssd(x[:, 3:], dt[:, 3:], A, B[:, 3:], C[:, 3:], h0, form="chunked", chunk=4)
    torch.testing.assert_close(with_zeros, without, **TOL)


def test_an_unknown_form_is_a_value_error():
    x, dt, A, B, C, _ = [t.detach() for t in _inputs(length=4)]
    with pytest.raises(ValueError, match="chunked, quadratic, recurrent"):
        ssd(x, dt, A, B, C, form="fft")
