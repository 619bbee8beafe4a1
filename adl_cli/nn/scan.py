"""The selective scan of Mamba (Gu and Dao 2023), three ways that compute the same function.

A diagonal linear recurrence over time, per channel d and state index n:

    h_t = a_t * h_{t-1} + b_t,     y_t = sum_n C_t[n] h_t[d, n]

with a_t = exp(delta_t[d] A[d, n]) (the zero-order-hold discretisation of dh/dt = A h; A < 0, so
0 < a_t < 1) and b_t = delta_t[d] B_t[n] x_t[d] (the Euler step Mamba uses for the input).

    scan_sequential  the loop over t: the reference (and the decode step: one t at a time)
    scan_parallel    Hillis-Steele doubling on the pairs (a, b): (a2, b2) after (a1, b1) is
                     (a2 a1, a2 b1 + b2), associative, so log2(L) vectorised steps reach every
                     prefix (O(L log L) work: the form mambapy's pscan computes)
    scan_chunked     chunks of T steps: inside a chunk the cumulative log-decay S_t gives
                     h_t = exp(S_t) h_start + sum_{s <= t} exp(S_t - S_s) b_s as one masked
                     (T x T) contraction, and the chunks are chained by their end states
                     (O(L T) work, L / T sequential steps)

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


def scan_chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Takes log a (<= 0) rather than a: the within-chunk decays exp(S_t - S_s) come from
    differences of cumulative sums, never from dividing small products."""
    bsz, length = b.shape[:2]
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for start in range(0, length, chunk):
        la, bc = log_a[:, start:start + chunk], b[:, start:start + chunk]
        t = la.shape[1]
        s = la.cumsum(1)  # (B, T, D, N)
        diff = s[:, :, None] - s[:, None, :]  # (B, T, T, D, N): S_t - S_s
        causal = torch.ones(t, t, dtype=torch.bool, device=b.device).tril()[None, :, :, None, None]
        decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
        hc = torch.einsum("btsdn,bsdn->btdn", decay, bc) + s.exp() * h[:, None]
        out.append(hc)
        h = hc[:, -1]
    return torch.cat(out, dim=1), h


SCANS = ("sequential", "parallel", "chunked")


def selective_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                   h0: torch.Tensor | None = None, *, method: str = "chunked", chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's SSM: x, delta (B, L, D) (delta > 0), A (D, N) (< 0), B, C (B, L, N), D (D,) the skip.
    Returns y (B, L, D) and the last state (B, D, N)."""
    log_a = delta[..., None] * A  # (B, L, D, N)
    b = (delta * x)[..., None] * B[:, :, None, :]
    if method == "sequential":
        h, last = scan_sequential(log_a.exp(), b, h0)
    elif method == "parallel":
        h, last = scan_parallel(log_a.exp(), b, h0)
    elif method == "chunked":
        h, last = scan_chunked(log_a, b, h0, chunk)
    else:
        raise ValueError(f"scan method must be one of {', '.join(SCANS)}, got '{method}'")
    y = torch.einsum("bldn,bln->bld", h, C)
    if D is not None:
        y = y + x * D
    return y, last
