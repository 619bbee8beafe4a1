"""Fused linear cross-entropy against the plain reference: F.cross_entropy(h @ W^T, y)."""

import pytest
import torch
import torch.nn.functional as F

from adl_cli.nn.losses import fused_linear_cross_entropy


def data(n=40, c=12, v=53, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, c, generator=g) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def reference(h, w, y, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=ignore_index)


@pytest.mark.parametrize("chunk", [1, 3, 16, 40, 1000])
def test_loss_and_grads_equal_reference_for_any_chunk(chunk):
    h, w, y = data()
    fused = fused_linear_cross_entropy(h, w, y, chunk_rows=chunk)
    gf = torch.autograd.grad(fused, (h, w))
    plain = reference(h, w, y)
    gp = torch.autograd.grad(plain, (h, w))
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_ignored_targets_count_neither_in_sum_nor_mean(ignore_index):
    h, w, y = data(n=30)
    y[::4] = ignore_index
    fused = fused_linear_cross_entropy(h, w, y, chunk_rows=7, ignore_index=ignore_index)
    gf = torch.autograd.grad(fused, (h, w))
    plain = reference(h, w, y, ignore_index)
    gp = torch.autograd.grad(plain, (h, w))
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert torch.all(gf[0][::4] == 0)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    h, w, y = data(n=8)
    y[:] = -100
    loss = fused_linear_cross_entropy(h, w, y, chunk_rows=3)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


def test_incoming_gradient_scales_both_grads():
    h, w, y = data()
    gf = torch.autograd.grad(fused_linear_cross_entropy(h, w, y, chunk_rows=9) * -2.5, (h, w))
    gp = torch.autograd.grad(reference(h, w, y) * -2.5, (h, w))
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_batched_input_and_single_side_gradients():
    h, w, y = data(n=24)
    h3, y3 = h.detach().view(2, 12, -1).requires_grad_(), y.view(2, 12)
    loss = fused_linear_cross_entropy(h3, w, y3, chunk_rows=5)
    gh, gw = torch.autograd.grad(loss, (h3, w))
    assert gh.shape == h3.shape
    gp = torch.autograd.grad(reference(h, w, y), (h, w))
    torch.testing.assert_close(gh.view_as(h), gp[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(gw, gp[1], atol=1e-7, rtol=1e-5)
    # only the weight, only the hidden states
    (gw_only,) = torch.autograd.grad(fused_linear_cross_entropy(h.detach(), w, y, chunk_rows=5), (w,))
    torch.testing.assert_close(gw_only, gp[1], atol=1e-7, rtol=1e-5)
    (gh_only,) = torch.autograd.grad(fused_linear_cross_entropy(h, w.detach(), y, chunk_rows=5), (h,))
    torch.testing.assert_close(gh_only, gp[0], atol=1e-7, rtol=1e-5)


def test_no_grad_path_matches_and_builds_no_graph():
    h, w, y = data()
    y[5] = -100
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y, chunk_rows=6)
        plain = reference(h, w, y)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-6)
    frozen = fused_linear_cross_entropy(h.detach(), w.detach(), y, chunk_rows=6)
    assert frozen.grad_fn is None
    torch.testing.assert_close(frozen, plain, atol=1e-6, rtol=1e-6)


def test_bf16_autocast_inputs_stay_close_to_fp32_and_keep_dtypes():
    h, w, y = data(n=32, c=16, v=64)
    plain = reference(h, w, y)
    gp = torch.autograd.grad(plain, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, chunk_rows=10)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, plain, atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(gh, gp[0], atol=3e-3, rtol=5e-2)
    torch.testing.assert_close(gw, gp[1], atol=3e-3, rtol=5e-2)


def test_bf16_tensors_without_autocast():
    h, w, y = data(n=32, c=16, v=64, dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(h, w, y, chunk_rows=10)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    ref = reference(h.float(), w.float(), y)
    torch.testing.assert_close(loss, ref, atol=3e-2, rtol=1e-2)


def test_second_backward_through_the_same_loss_is_a_clear_error():
    h, w, y = data()
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_chunk_rows():
    h, w, y = data()
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(h, w, y, chunk_rows=0)
