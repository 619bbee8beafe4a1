"""FlashAttention forward and backward as Triton kernels (Dao et al. 2022; Dao 2023).

Forward, one program per (query block, batch x head)::

    for each key block j in the causal / window range of the query block:
        S = Q_i K_j^T * scale (masked);  m' = max(m, rowmax S);  P = exp(S - m')
        l = exp(m - m') l + rowsum P;  acc = exp(m - m') acc + P V_j;  m = m'
    O_i = acc / l;  L_i = m + log l

Backward (FlashAttention-2): delta = rowsum(dO * O) - dL in torch, then one kernel per
key block accumulates dK_j, dV_j over the query blocks (and the query heads sharing the
key/value head), and one kernel per query block accumulates dQ_i, so no atomics.

``flash.py`` uses these on CUDA tensors when triton imports. With ``TRITON_INTERPRET=1``
set before this module is imported, the same kernels run on CPU tensors in triton's
interpreter, which is how the tests check them against the reference.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    _HAVE_TRITON = False


def available() -> bool:
    return _HAVE_TRITON


def supports(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """dtype and head size the kernels handle (value head size equal to the query's)."""
    same = v is None or v.shape[-1] == q.shape[-1]
    return same and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


if _HAVE_TRITON:

    @triton.jit
    def _key_range(m0, Tq, Tk, WINDOW, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        off = Tk - Tq
        lo = 0
        hi = Tk
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M + off)
        if HAS_WINDOW:
            lo = tl.maximum(lo, m0 + off - WINDOW + 1)
            if not CAUSAL:
                hi = tl.minimum(hi, m0 + BLOCK_M - 1 + off + WINDOW)
        return lo, hi

    @triton.jit
    def _allowed(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        qpos = offs_m[:, None] + (Tk - Tq)
        kpos = offs_n[None, :]
        ok = (kpos < Tk) & (offs_m[:, None] < Tq)
        if CAUSAL:
            ok = ok & (kpos <= qpos)
        if HAS_WINDOW:
            ok = ok & (qpos - kpos < WINDOW)
            if not CAUSAL:
                ok = ok & (kpos - qpos < WINDOW)
        return ok

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, L,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
        H, G, Tq, Tk, D, scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // G
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=(offs_m[:, None] < Tq) & dmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _key_range(m0, Tq, Tk, WINDOW, BLOCK_M, CAUSAL, HAS_WINDOW)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n[:, None] < Tk) & dmask
            k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(_allowed(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        lse = tl.where(dead, float("-inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < Tq) & dmask)
        tl.store(L + b * slb + h * slh + offs_m, lse, mask=offs_m < Tq)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, L, DELTA, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, slb, slh,
        H, HKV, G, Tq, Tk, D, scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (key block, batch x kv head). Q/DO share strides; K/V/DK/DV share strides."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        kv_mask = (offs_n[:, None] < Tk) & dmask
        kv_off = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        off = Tk - Tq
        # query rows that may see keys [n0, n0 + BLOCK_N)
        lo = 0
        hi = Tq
        if CAUSAL:
            lo = tl.maximum(0, n0 - off)
        if HAS_WINDOW:
            hi = tl.minimum(hi, n0 + BLOCK_N - 1 + WINDOW - off)
            if not CAUSAL:
                lo = tl.maximum(lo, n0 - WINDOW + 1 - off)
        lo = (lo // BLOCK_M) * BLOCK_M
        for g in range(0, G):
            h = hk * G + g
            for m0 in range(lo, hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                q_mask = (offs_m[:, None] < Tq) & dmask
                q_off = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
                q = tl.load(Q + q_off, mask=q_mask, other=0.0)
                do = tl.load(DO + q_off, mask=q_mask, other=0.0)
                lse = tl.load(L + b * slb + h * slh + offs_m, mask=offs_m < Tq, other=0.0)
                delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=offs_m < Tq, other=0.0)
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                ok = _allowed(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, L, DELTA, DQ,
        sqb, sqh, sqt, skb, skh, skt, slb, slh,
        H, G, Tq, Tk, D, scale, WINDOW,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // G
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < D
        q_mask = (offs_m[:, None] < Tq) & dmask
        q_off = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(L + b * slb + h * slh + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=offs_m < Tq, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _key_range(m0, Tq, Tk, WINDOW, BLOCK_M, CAUSAL, HAS_WINDOW)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n[:, None] < Tk) & dmask
            kv_off = b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            ok = _allowed(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _blocks(D: int, dtype: torch.dtype):
    block_d = max(16, 1 << (D - 1).bit_length())
    big = 64 if block_d <= 64 else 32
    precision = "ieee" if dtype == torch.float32 else None  # exact fp32 products; 16-bit: the default
    return big, big, block_d, precision


def _launch_forward(q, k, v, causal, scale, window, block_m=None, block_n=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn, bd, precision = _blocks(D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Tq, bm), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        H, H // Hkv, Tq, Tk, D, scale, window or 0,
        CAUSAL=causal, HAS_WINDOW=window is not None, PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )
    return out, lse


def _launch_backward(q, k, v, do, lse, delta, causal, scale, window, block_m=None, block_n=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn, bd, precision = _blocks(D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(CAUSAL=causal, HAS_WINDOW=window is not None, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0), lse.stride(1))
    _bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *strides, H, Hkv, H // Hkv, Tq, Tk, D, scale, window or 0, **common
    )
    _bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, do, lse, delta, dq, *strides, H, H // Hkv, Tq, Tk, D, scale, window or 0, **common
    )
    return dq, dk, dv


class _TritonFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, block_m, block_n):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _launch_forward(q, k, v, causal, scale, window, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (causal, scale, window, block_m, block_n)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, window, block_m, block_n = ctx.cfg
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        dq, dk, dv = _launch_backward(q, k, v, dout, lse, delta.contiguous(), causal, scale, window, block_m, block_n)
        return dq, dk, dv, None, None, None, None, None


def triton_attention_with_lse(q, k, v, *, causal=True, scale=None, window=None, block_m=None, block_n=None):
    """(out, lse) from the Triton kernels; both differentiable (backward also in Triton)."""
    if not _HAVE_TRITON:
        raise ValueError("triton is not installed; use flash attention's torch backend")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"n_head={q.shape[1]} is not a multiple of n_kv_head={k.shape[1]}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the triton flash kernels need the value head size equal to the query's")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TritonFlash.apply(q, k, v, causal, scale, window, block_m, block_n)
