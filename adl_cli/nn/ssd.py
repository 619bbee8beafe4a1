"""The state-space duality of Mamba-2 (Dao and Gu 2024, "Transformers are SSMs"), three ways that
compute the same function.

Per head h, with a scalar decay a_t = exp(dt_t A_h) (A_h < 0) times the identity, a state
H_t (P x N) and inputs x_t (P), B_t, C_t (N, shared by the heads):

    H_t = a_t H_{t-1} + dt_t x_t B_t^T,     y_t = H_t C_t

    ssd_recurrent  the loop over t: the reference (and the decode step)
    ssd_quadratic  the same map as masked attention: y = (L o C B^T) (dt x), with the decay
                   matrix L[t, s] = a_{s+1} ... a_t for s <= t (0 above): O(L^2) work, matmuls
    ssd_chunked    chunks of Q positions: inside a chunk the quadratic form; each chunk's end
                   state from its inputs; the states chained across chunks by the recurrence;
                   each position reads its chunk's incoming state through C: O(L Q) work

Shapes: x (b, l, h, p), dt (b, l, h) (>= 0), A (h,), B and C (b, l, n), h0 (b, h, p, n).
Each returns y (b, l, h, p) and the last state (b, h, p, n).
"""

from __future__ import annotations

import torch


def segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): [t, s] = log_a[s+1] + ... + log_a[t] for s <= t, -inf above the
    diagonal. Summed per pair (a cumulative sum down each column), never as a difference of two
    long prefix sums, so it stays exact where those would cancel."""
    t = log_a.shape[-1]
    grid = log_a[..., None, :].expand(*log_a.shape[:-1], t, t)  # [s, r] = log_a[r]
    after = torch.ones(t, t, dtype=torch.bool, device=log_a.device).triu(1)  # r > s
    sums = grid.masked_fill(~after, 0.0).cumsum(-1).transpose(-1, -2)  # [t, s]: the sum over s < r <= t
    return sums.masked_fill(~after.transpose(0, 1).logical_or(torch.eye(t, dtype=torch.bool, device=log_a.device)), float("-inf"))


def ssd_recurrent(x, dt, A, B, C, h0=None):
    bsz, length, heads, p = x.shape
    h = x.new_zeros(bsz, heads, p, B.shape[-1]) if h0 is None else h0
    out = []
    for t in range(length):
        a = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = a * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        out.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(out, 1), h


def ssd_quadratic(x, dt, A, B, C, h0=None):
    log_a = (dt * A).transpose(1, 2)  # (b, h, l)
    decay = torch.exp(segment_sums(log_a))  # (b, h, l, l)
    scores = decay * (C @ B.transpose(1, 2))[:, None]  # (b, h, t, s)
    xdt = x * dt[..., None]
    y = torch.einsum("bhts,bshp->bthp", scores, xdt)
    to_end = torch.exp(segment_sums(torch.nn.functional.pad(log_a, (0, 1)))[..., -1, :-1])  # a_{s+1} .. a_L
    last = torch.einsum("bhs,bshp,bsn->bhpn", to_end, xdt, B)
    if h0 is not None:
        from_start = torch.exp(log_a.cumsum(-1))  # a_1 .. a_t
        y = y + torch.einsum("bht,bhpn,btn->bthp", from_start, h0, C)
        last = last + from_start[..., -1, None, None] * h0
    return y, last


def ssd_chunked(x, dt, A, B, C, h0=None, chunk: int = 32):
    if chunk < 1:
        raise ValueError(f"the SSD chunk must be >= 1, got {chunk}")
    bsz, length, heads, p = x.shape
    n = B.shape[-1]
    pad = -length % chunk
    if pad:  # padded steps (dt = 0) leave the state unchanged and write nothing
        x, dt, B, C = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    k = x.shape[1] // chunk
    # layout (b, k, h, q, ...): a chunk's positions next to the head's feature dimension, for matmuls
    xdt = (x * dt[..., None]).view(bsz, k, chunk, heads, p).transpose(2, 3)  # (b, k, h, q, p)
    Bc, Cc = B.view(bsz, k, 1, chunk, n), C.view(bsz, k, 1, chunk, n)
    log_a = (dt * A).view(bsz, k, chunk, heads).transpose(2, 3)  # (b, k, h, q)
    cum = log_a.cumsum(-1)  # within a chunk: a_1 .. a_t from the chunk's start
    # 1. inside each chunk: the quadratic form
    scores = torch.exp(segment_sums(log_a)) * (Cc @ Bc.transpose(-1, -2))  # (b, k, h, t, s)
    y = scores @ xdt  # (b, k, h, q, p)
    # 2. each chunk's own end state: its inputs decayed to the chunk's end
    to_end = torch.exp(cum[..., -1:] - cum)  # a_{s+1} .. a_end, all within one chunk
    states = (xdt * to_end[..., None]).transpose(-1, -2) @ Bc  # (b, k, h, p, n)
    # 3. the states chained across chunks: what enters chunk c
    carry = x.new_zeros(bsz, heads, p, n) if h0 is None else h0
    whole = torch.exp(cum[..., -1])  # (b, k, h): a chunk's total decay
    incoming = []
    for c in range(k):
        incoming.append(carry)
        carry = whole[:, c, :, None, None] * carry + states[:, c]
    incoming = torch.stack(incoming, 1)  # (b, k, h, p, n)
    # 4. each position reads the incoming state, decayed from the chunk's start
    y = y + (Cc @ incoming.transpose(-1, -2)) * torch.exp(cum)[..., None]
    return y.transpose(2, 3).reshape(bsz, k * chunk, heads, p)[:, :length], carry


SSD_FORMS = {"chunked": ssd_chunked, "quadratic": ssd_quadratic, "recurrent": ssd_recurrent}


def ssd(x, dt, A, B, C, h0=None, *, form: str = "chunked", chunk: int = 32):
    if form not in SSD_FORMS:
        raise ValueError(f"SSD form must be one of {', '.join(SSD_FORMS)}, got '{form}'")
    if form == "chunked":
        return ssd_chunked(x, dt, A, B, C, h0, chunk)
    return SSD_FORMS[form](x, dt, A, B, C, h0)
