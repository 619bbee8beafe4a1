"""The mLSTM cell: the recurrent, parallel and chunkwise forms equal the cell's definition
without a stabiliser (float64, values and gradients); the stabilised forms stay finite in float32
where the raw exponential gate overflows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adl_cli.nn.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

TOL = dict(atol=1e-10, rtol=1e-10)  # float64; sums of at most a few hundred terms


def _inputs(length=23, heads=2, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, length, d, generator=g, dtype=dtype) for _ in range(3))
    i_pre = torch.randn(2, heads, length, generator=g, dtype=dtype)
    f_pre = torch.randn(2, heads, length, generator=g, dtype=dtype) + 2
    return [t.requires_grad_() for t in (q, k / d ** 0.5, v, i_pre, f_pre)]


def definition(q, k, v, i_pre, f_pre):
    """The cell as written in the paper: raw gates, no stabiliser."""
    b, h, length, d = q.shape
    C, n, out = q.new_zeros(b, h, d, d), q.new_zeros(b, h, d), []
    for t in range(length):
        i, f = torch.exp(i_pre[..., t]), torch.sigmoid(f_pre[..., t])
        C = f[..., None, None] * C + i[..., None, None] * v[:, :, t, :, None] * k[:, :, t, None, :]
        n = f[..., None] * n + i[..., None] * k[:, :, t]
        den = torch.clamp((n * q[:, :, t]).sum(-1).abs(), min=1.0)
        out.append((C @ q[:, :, t, :, None]).squeeze(-1) / den[..., None])
    return torch.stack(out, 2)


FORMS = {"recurrent": lambda *a: mlstm_recurrent(*a)[0], "parallel": mlstm_parallel,
         "chunkwise-8": lambda *a: mlstm_chunkwise(*a, chunk=8)[0], "chunkwise-5": lambda *a: mlstm_chunkwise(*a, chunk=5)[0],
         "chunkwise-64": lambda *a: mlstm_chunkwise(*a, chunk=64)[0]}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_equals_the_definition_forward_and_backward(form):
    args = _inputs()
    want = definition(*args)
    got = FORMS[form](*args)
    torch.testing.assert_close(got, want, **TOL)
    w = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad((got * w).sum(), args), torch.autograd.grad((want * w).sum(), args)):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_a_pass_continued_from_its_state_equals_one_pass(form):
    q, k, v, i, f = [t.detach() for t in _inputs(length=20)]
    run = mlstm_recurrent if form == "recurrent" else lambda *a, state=None: mlstm_chunkwise(*a, state=state, chunk=6)
    whole, (C, n, m) = run(q, k, v, i, f)
    first, mid = run(q[:, :, :11], k[:, :, :11], v[:, :, :11], i[..., :11], f[..., :11])
    second, (C2, n2, m2) = run(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], i[..., 11:], f[..., 11:], state=mid)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, **TOL)
    # the stored state is C exp(-m): the same memory whatever stabiliser each path chose
    torch.testing.assert_close(C2 * torch.exp(m2)[..., None, None], C * torch.exp(m)[..., None, None], **TOL)
    torch.testing.assert_close(n2 * torch.exp(m2)[..., None], n * torch.exp(m)[..., None], **TOL)


def test_the_stabiliser_keeps_float32_finite_where_the_raw_gate_overflows():
    q, k, v, i, f = [t.detach() for t in _inputs(length=16)]
    q, k = q.abs(), k.abs()  # n.q without cancellation: its float32 error stays at the rounding's scale
    i = i + 120.0  # exp(120) overflows float32
    assert not torch.isfinite(torch.exp(i.float())).all()
    want = definition(q, k, v, i, f)  # float64 holds exp(120)
    for form in ("recurrent", "parallel", "chunkwise-5"):
        got = FORMS[form](*(t.float() for t in (q, k, v, i, f)))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # float32 (eps 1.2e-7), 16-term sums


def test_a_shut_input_gate_and_an_open_forget_gate_pass_the_state_through():
    """i~ = -inf, log f = 0 (a left-padded position): the state and the output stream unchanged."""
    q, k, v, i, f = [t.detach() for t in _inputs(length=8)]
    i, f = i.clone(), f.clone()
    i[..., :3], f[..., :3] = float("-inf"), float("inf")
    got, _ = mlstm_chunkwise(q, k, v, i, f, chunk=4)
    alone, _ = mlstm_chunkwise(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], i[..., 3:], f[..., 3:], chunk=4)
    torch.testing.assert_close(got[:, :, 3:], alone, **TOL)
    assert (got[:, :, :3] == 0).all()
