"""The selective scan of Mamba (Gu and Dao 2023), three ways that compute the same function.

A diagonal linear recurrence over time, per channel d and state index n:

    h_t = a_t * h_{t-1} + b_t,     y_t = sum_n C_t[n] h_t[d, n]

with a_t = exp(delta_t[d] A[d, n]) (the zero-order-hold discretisation of dh/dt = A h; A < 0, so
0 < a_t < 1) and b_t = delta_t[d] B_t[n] x_t[d] (the Euler step Mamba uses for the input).

    scan_sequential  the loop over t: the reference (and the decode step: one t at a time)
    scan_parallel    Hillis-Steele doubling on the pairs (a, b): (a2, b2) after (a1, b1) is
                     (a2 a1, a2 b1 + b2), associative, so log2(L) vectorised steps reach every
                     prefix (O(L log L) work: the form mambapy's pscan computes)
    scan_chunked     chunks of T steps: the loop over a chunk's positions runs on all chunks at
                     once, the chunks are chained by their end states (L / T steps on one
                     state), and each position adds its chunk's incoming state times the decay
                     from the chunk's start: O(L) work in T + L / T vectorised steps, in place,
                     with the backward written out (the gradient is the same scan run backwards)

Every form takes a: (B, L, D, N), b: (B, L, D, N), an optional h0: (B, D, N), and returns the
states h: (B, L, D, N) and the last state; ``selective_scan`` builds a and b from Mamba's inputs
and contracts with C.
"""

from __future__ import annotations

import torch


def scan_sequential(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1), h


def scan_parallel(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if h0 is not None:  # the first input absorbs the initial state: b_0 + a_0 h0
        b = torch.cat([(b[:, :1] + a[:, :1] * h0[:, None]), b[:, 1:]], dim=1)
    length, step = a.shape[1], 1
    while step < length:  # after this pass, (a_t, b_t) composes steps t - 2 step + 1 .. t
        a_prev, b_prev = a[:, :-step], b[:, :-step]
        b = torch.cat([b[:, :step], a[:, step:] * b_prev + b[:, step:]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a_prev], dim=1)
        step *= 2
    return b, b[:, -1]


def _chunk_scan_(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, chunk: int, reverse: bool) -> torch.Tensor:
    """h_t = a_t h_{t-1} + h_t in place (h holds b on entry; ``reverse``: h_t = a_t h_{t+1} + h_t),
    on (B, L, ...) tensors, as two levels of loops: one over the T positions of a chunk, vectorised
    across all chunks at once, then one over the L / T chunks chaining their end states, then one
    vectorised fix-up that adds each chunk's incoming state times the decay to each position; the
    L mod T positions left over (at the end, or the start when reversed) are stepped one by one.
    Returns the state after the last step (the first one when ``reverse``)."""
    bsz, length = h.shape[:2]
    k, rest = divmod(length, chunk)
    carry = h.new_zeros((bsz,) + h.shape[2:]) if h0 is None else h0
    if k:
        span = slice(rest, length) if reverse else slice(0, k * chunk)
        shape = (bsz, k, chunk) + h.shape[2:]
        av, hv = a[:, span].reshape(shape), h[:, span].view(shape)
        decay = av.clone()  # becomes the product of a from the chunk's start (its end when reverse) to t
        for t in (range(chunk - 2, -1, -1) if reverse else range(1, chunk)):
            prev = t + 1 if reverse else t - 1
            hv[:, :, t].addcmul_(av[:, :, t], hv[:, :, prev])
            decay[:, :, t].mul_(decay[:, :, prev])
        edge = 0 if reverse else chunk - 1
        incoming = torch.empty((bsz, k) + h.shape[2:], dtype=h.dtype, device=h.device)
        for c in (range(k - 1, -1, -1) if reverse else range(k)):
            incoming[:, c] = carry
            carry = decay[:, c, edge] * carry + hv[:, c, edge]
        hv.addcmul_(decay, incoming[:, :, None])
    for t in (range(rest - 1, -1, -1) if reverse else range(k * chunk, length)):
        carry = h[:, t].addcmul_(a[:, t], carry)
    return carry


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with its backward written out: the gradient g of the states obeys the
    same recurrence run backwards, g_t = dL/dh_t + a_{t+1} g_{t+1}, so it is one more chunked scan;
    then dL/db_t = g_t, dL/da_t = g_t h_{t-1}, dL/dh0 = a_0 g_0."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = b.contiguous().clone()
        last = _chunk_scan_(a.contiguous(), h, h0, chunk, reverse=False).clone()
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h, last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        g = torch.zeros_like(h) if grad_h is None else grad_h.contiguous().clone()
        if grad_last is not None:
            g[:, -1] += grad_last
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        _chunk_scan_(a_next, g, None, ctx.chunk, reverse=True)
        grad_a = torch.empty_like(g)
        torch.mul(g[:, 1:], h[:, :-1], out=grad_a[:, 1:])
        if h0 is None:
            grad_a[:, 0] = 0
        else:
            torch.mul(g[:, 0], h0, out=grad_a[:, 0])
        grad_h0 = None if h0 is None or not ctx.needs_input_grad[2] else a[:, 0] * g[:, 0]
        return grad_a, g, grad_h0, None


def scan_chunked(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk < 1:
        raise ValueError(f"the scan's chunk must be >= 1, got {chunk}")
    return _ChunkedScan.apply(a, b, h0, chunk)


class _SelectiveScan(torch.autograd.Function):
    """Mamba's whole SSM (discretise, chunked scan, read out by C) with its backward written out,
    so that autograd keeps two (B, L, D, N) tensors (a and h) rather than one per operation:

        g = the state gradient, dL/dh_t = dy_t C_t plus the next state's share (a backward scan)
        dC_t = sum_d dy_t h_t,  d(delta x)_t = sum_n g_t B_t,  dB_t = sum_d g_t (delta x)_t
        d(log a)_t = g_t h_{t-1} a_t,  d delta_t += sum_n d(log a)_t A,  dA = sum_{b,t} d(log a)_t delta_t"""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, chunk):
        dx = delta * x
        a = torch.exp(delta[..., None] * A)
        h = dx[..., None] * B[:, :, None, :]
        last = _chunk_scan_(a, h, h0, chunk, reverse=False).clone()
        y = (h @ C[..., None]).squeeze(-1)
        ctx.save_for_backward(x, delta, A, B, C, h0, a, h)
        ctx.chunk = chunk
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        x, delta, A, B, C, h0, a, h = ctx.saved_tensors
        length = h.shape[1]
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        grad_C = (grad_y[:, :, None, :] @ h).squeeze(-2)
        g = grad_y[..., None] * C[:, :, None, :]
        if grad_last is not None:
            g[:, -1] += grad_last
        if length > 1:  # g_t += a_{t+1} g_{t+1} for t < L - 1, the last position entering from the right
            _chunk_scan_(a[:, 1:], g[:, :-1], g[:, -1], ctx.chunk, reverse=True)
        dla = torch.empty_like(g)
        torch.mul(g[:, 1:], h[:, :-1], out=dla[:, 1:])
        if h0 is None:
            dla[:, 0] = 0
        else:
            torch.mul(g[:, 0], h0, out=dla[:, 0])
        dla.mul_(a)
        grad_dx = (g @ B[..., None]).squeeze(-1)
        grad_A = torch.einsum("bldn,bld->dn", dla, delta)
        grad_delta = dla.mul_(A).sum(-1) + grad_dx * x
        grad_B = ((delta * x)[:, :, None, :] @ g).squeeze(-2)
        grad_h0 = None if h0 is None or not ctx.needs_input_grad[5] else a[:, 0] * g[:, 0]
        return grad_dx * delta, grad_delta, grad_A, grad_B, grad_C, grad_h0, None


SCANS = ("sequential", "parallel", "chunked")


def selective_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                   h0: torch.Tensor | None = None, *, method: str = "chunked", chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's SSM: x, delta (B, L, D) (delta > 0), A (D, N) (< 0), B, C (B, L, N), D (D,) the skip.
    Returns y (B, L, D) and the last state (B, D, N). "chunked" is one fused operation (its
    backward written out); the other two are composed from torch operations (autograd's
    gradients: the reference)."""
    if method == "chunked":
        if chunk < 1:
            raise ValueError(f"the scan's chunk must be >= 1, got {chunk}")
        y, last = _SelectiveScan.apply(x, delta, A, B, C, h0, chunk)
    elif method in SCANS:
        log_a = delta[..., None] * A  # (B, L, D, N)
        b = (delta * x)[..., None] * B[:, :, None, :]
        h, last = (scan_sequential if method == "sequential" else scan_parallel)(log_a.exp(), b, h0)
        y = torch.einsum("bldn,bln->bld", h, C)
    else:
        raise ValueError(f"scan method must be one of {', '.join(SCANS)}, got '{method}'")
    if D is not None:
        y = y + x * D
    return y, last
