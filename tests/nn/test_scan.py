"""Mamba's selective scan: the parallel (doubling) and chunked forms equal the sequential loop,
values and gradients, in float64; a scan continued from a state equals one scan over the whole."""

from __future__ import annotations

import pytest
import torch

from adl_cli.nn.scan import selective_scan

TOL = dict(atol=1e-10, rtol=1e-10)  # float64; sums of at most a few hundred terms


def _inputs(length=37, d=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, d, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(2, length, d, generator=g, dtype=torch.float64))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1
    B = torch.randn(2, length, n, generator=g, dtype=torch.float64)
    C = torch.randn(2, length, n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, d, n, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D, h0)]


@pytest.mark.parametrize("method,chunk", [("parallel", 0), ("chunked", 8), ("chunked", 5), ("chunked", 64)])
def test_parallel_and_chunked_scans_equal_the_loop_forward_and_backward(method, chunk):
    args = _inputs()
    ref_y, ref_h = selective_scan(*args[:6], h0=args[6], method="sequential")
    y, h = selective_scan(*args[:6], h0=args[6], method=method, chunk=chunk or 32)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(h, ref_h, **TOL)
    w = torch.randn_like(ref_y)
    ref_grads = torch.autograd.grad((ref_y * w).sum() + ref_h.sum(), args)
    grads = torch.autograd.grad((y * w).sum() + h.sum(), args)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("method", ["sequential", "parallel", "chunked"])
def test_a_scan_continued_from_its_state_equals_one_scan(method):
    x, delta, A, B, C, D, _ = [t.detach() for t in _inputs(length=20)]
    whole, last = selective_scan(x, delta, A, B, C, D, method=method, chunk=6)
    first, mid = selective_scan(x[:, :11], delta[:, :11], A, B[:, :11], C[:, :11], D, method=method, chunk=6)
    second, end = selective_scan(x[:, 11:], delta[:, 11:], A, B[:, 11:], C[:, 11:], D, h0=mid, method=method, chunk=6)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, **TOL)
    torch.testing.assert_close(end, last, **TOL)


def test_an_unknown_method_is_a_value_error():
    x, delta, A, B, C, D, _ = [t.detach() for t in _inputs(length=4)]
    with pytest.raises(ValueError, match="sequential, parallel, chunked"):
        selective_scan(x, delta, A, B, C, D, method="fft")


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_the_two_level_scan_on_its_own_equals_the_loop_forward_and_backward(chunk):
    """scan_chunked (a, b -> states; the primitive benchmarks/scan.py times) with its written-out backward."""
    from adl_cli.nn.scan import scan_chunked, scan_sequential

    g = torch.Generator().manual_seed(1)
    a = (torch.rand(2, 23, 3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    b = torch.randn(2, 23, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref_h, ref_last = scan_sequential(a, b, h0)
    h, last = scan_chunked(a, b, h0, chunk)
    torch.testing.assert_close(h, ref_h, **TOL)
    torch.testing.assert_close(last, ref_last, **TOL)
    w = torch.randn_like(ref_h)
    want = torch.autograd.grad((ref_h * w).sum() + ref_last.square().sum(), (a, b, h0))
    got = torch.autograd.grad((h * w).sum() + last.square().sum(), (a, b, h0))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)
