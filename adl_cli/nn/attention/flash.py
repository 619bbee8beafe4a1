"""Tiled online-softmax attention (FlashAttention), forward and backward, in plain PyTorch.

Dao, Fu, Ermon, Rudra, Re, "FlashAttention: Fast and Memory-Efficient Exact Attention
with IO-Awareness" (2022); the backward follows FlashAttention-2 (Dao, 2023).

For each block of queries Q_i and each block of keys/values (K_j, V_j) in turn::

    S    = Q_i K_j^T * scale (+ bias, masked to -inf)
    m'   = max(m, rowmax S);   P = exp(S - m');   a = exp(m - m')
    l    = a l + rowsum P;     O_i = a O_i + P V_j;   m = m'
    O_i /= l;                  L_i = m + log l          (the log-sum-exp of row i)

Only O and L are kept for the backward, which recomputes each score tile::

    P  = exp(S - L);   dV_j += P^T dO_i;   dP = dO_i V_j^T
    dS = P * (dP - D_i)  with D_i = rowsum(dO_i * O_i) (- dL_i when L itself has a gradient)
    dQ_i += scale dS K_j;   dK_j += scale dS^T Q_i

Memory is O(T * block) instead of O(T^2). Tiles that the causal or sliding-window mask
removes entirely are never computed; with ``segment_ids`` (packed documents, ids
non-decreasing along each row as packing writes them) neither are tiles whose keys all
belong to earlier documents than every query's in every row (the varlen saving). Grouped-query heads are folded into the rows of a
query tile ((time, group) order), so a key/value head is read once for all its query
heads. On CUDA tensors the forward (and backward) run as Triton kernels
(``flash_triton``) when triton is importable and no score bias is given.
"""

from __future__ import annotations

import math

import torch

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.mask import allowed_pairs

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


# ---------------------------------------------------------------------------------
# Layout: (B, H, T, D) <-> rows (B * Hkv, T * G, D) with G = H // Hkv query heads per
# key/value head, rows ordered (time, group) so a block of query times is contiguous.


def _to_rows(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    B, H, T, D = q.shape
    G = H // n_kv
    if G == 1:
        return q.reshape(B * H, T, D)
    return q.view(B, n_kv, G, T, D).transpose(2, 3).reshape(B * n_kv, T * G, D)


def _from_rows(x: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    """Inverse of _to_rows for (N, T*G, D) or, without the last dim, (N, T*G)."""
    n_kv = x.shape[0] // B
    G = H // n_kv
    if x.dim() == 2:
        return x.view(B, n_kv, T, G).transpose(2, 3).reshape(B, H, T)
    D = x.shape[-1]
    return x.view(B, n_kv, T, G, D).transpose(2, 3).reshape(B, H, T, D)


def _check(q, k, v, window):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash attention expects q, k, v of shape (B, H, T, D)")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"n_head={q.shape[1]} is not a multiple of n_kv_head={k.shape[1]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


class _Plan:
    """Which key range each query block visits, and the masks of partially allowed tiles."""

    def __init__(self, tq, tk, causal, window, block_q, block_k, device, q_offset=None, segment_ids=None):
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block_q and block_k must be >= 1, got {block_q}, {block_k}")
        self.tq, self.tk = tq, tk
        self.seg = segment_ids
        if segment_ids is not None:
            if tq != tk or segment_ids.shape[-1] != tq:
                raise ValueError("segment_ids (packed documents) apply to self-attention over the whole sequence (Tq == Tk)")
            self.sorted = bool((segment_ids[:, 1:] >= segment_ids[:, :-1]).all()) if tq > 1 else True
        self.off = tk - tq if q_offset is None else int(q_offset)  # query i sits at absolute position i + off
        self.causal, self.window = causal, window
        self.block_q, self.block_k, self.device = block_q, block_k, device
        self._masks: dict = {}

    def q_blocks(self):
        for q0 in range(0, self.tq, self.block_q):
            yield q0, min(q0 + self.block_q, self.tq)

    def k_range(self, q0, q1):
        """[lo, hi) of keys that some query in [q0, q1) may see."""
        first, last = q0 + self.off, q1 - 1 + self.off  # absolute query positions
        lo, hi = 0, self.tk
        if self.causal:
            hi = min(hi, last + 1)
        if self.window is not None:
            lo = max(lo, first - self.window + 1)
            if not self.causal:
                hi = min(hi, last + self.window)
        return lo, max(lo, hi)

    def k_chunks(self, q0, q1):
        lo, hi = self.k_range(q0, q1)
        bk = self.block_k
        start = lo
        while start < hi:
            # align chunk ends to multiples of block_k so diagonal tiles repeat (mask cache)
            end = min(hi, (start // bk + 1) * bk)
            yield start, end
            start = end

    def skip(self, q0, q1, k0, k1) -> bool:
        """True when no query of the tile shares a document with any of its keys, in any row."""
        if self.seg is None or not self.sorted:
            return False
        return bool((self.seg[:, k0:k1].amax(dim=1) < self.seg[:, q0:q1].amin(dim=1)).all())

    def seg_mask(self, q0, q1, k0, k1):
        """Boolean (B, 1, nq, 1, nk) of pairs in different documents, or None (none such)."""
        if self.seg is None:
            return None
        other = self.seg[:, q0:q1, None] != self.seg[:, None, k0:k1]
        if not other.any():
            return None
        return other[:, None, :, None, :]

    def mask(self, q0, q1, k0, k1):
        """Boolean (q1-q0, 1, k1-k0) of allowed pairs, or None when the tile is fully allowed."""
        first, last = q0 + self.off, q1 - 1 + self.off
        full = True
        if self.causal and k1 - 1 > first:
            full = False
        if self.window is not None:
            if last - k0 >= self.window:
                full = False
            if not self.causal and k1 - 1 - first >= self.window:
                full = False
        if full:
            return None
        key = (first - k0, q1 - q0, k1 - k0)
        m = self._masks.get(key)
        if m is None:
            q_pos = torch.arange(first, last + 1, device=self.device)
            k_pos = torch.arange(k0, k1, device=self.device)
            allowed = allowed_pairs(q_pos, k_pos, causal=self.causal, window=self.window)
            m = (~allowed).unsqueeze(1)  # True where masked; broadcasts over the group axis
            self._masks[key] = m
        return m


def _bias_tile(bias_rows, q0, q1, k0, k1, G):
    """Slice of a (B, Hkv, G, Tq, Tk)-expanded bias as (N, (q1-q0)*G, k1-k0)."""
    t = bias_rows[:, :, :, q0:q1, k0:k1]
    B, Hkv = t.shape[0], t.shape[1]
    return t.permute(0, 1, 3, 2, 4).reshape(B * Hkv, (q1 - q0) * G, k1 - k0)


def _apply(S, mask, G, seg=None):
    """S: (N, nq*G, nk); mask (nq, 1, nk) of removed pairs; seg (B, 1, nq, 1, nk) of pairs in
    different documents (N = B * Hkv)."""
    N, R, nk = S.shape
    if mask is not None:
        S.view(N, R // G, G, nk).masked_fill_(mask, float("-inf"))
    if seg is not None:
        B = seg.shape[0]
        S.view(B, N // B, R // G, G, nk).masked_fill_(seg, float("-inf"))
    return S


def _forward_rows(qs, k, v, G, plan, bias_rows=None):
    """Online-softmax forward on row layout. qs is q * scale. Returns out (N, Tq*G, D), lse (N, Tq*G)."""
    N, R, D = qs.shape
    out = torch.empty(N, R, v.shape[-1], dtype=qs.dtype, device=qs.device)
    lse = torch.empty(N, R, dtype=qs.dtype, device=qs.device)
    kt = k.transpose(1, 2)
    neg_inf = float("-inf")
    for q0, q1 in plan.q_blocks():
        r0, r1 = q0 * G, q1 * G
        qi = qs[:, r0:r1]
        m = l = acc = None
        for k0, k1 in plan.k_chunks(q0, q1):
            if plan.skip(q0, q1, k0, k1):
                continue
            S = torch.bmm(qi, kt[:, :, k0:k1])
            if bias_rows is not None:
                S += _bias_tile(bias_rows, q0, q1, k0, k1, G)
            mask = plan.mask(q0, q1, k0, k1)
            seg = plan.seg_mask(q0, q1, k0, k1)
            _apply(S, mask, G, seg)
            rowmax = S.amax(dim=-1)
            if m is None:
                m_new = rowmax
            else:
                m_new = torch.maximum(m, rowmax)
            # rows with nothing allowed yet keep m = -inf; subtract 0 there so exp gives 0, not nan
            m_safe = m_new.masked_fill(m_new == neg_inf, 0.0) if (mask is not None or seg is not None or bias_rows is not None) else m_new
            P = S.sub_(m_safe.unsqueeze(-1)).exp_()
            if m is None:
                l = P.sum(dim=-1)
                acc = torch.bmm(P, v[:, k0:k1])
            else:
                alpha = (m - m_safe).exp_()
                l = l.mul_(alpha).add_(P.sum(dim=-1))
                acc.mul_(alpha.unsqueeze(-1)).baddbmm_(P, v[:, k0:k1])
            m = m_new
        if m is None:  # no key visible to any query of the block
            out[:, r0:r1] = 0
            lse[:, r0:r1] = neg_inf
            continue
        dead = l == 0
        if dead.any():  # rows that see no key at all: output 0, lse -inf
            l = l.masked_fill(dead, 1.0)
        torch.div(acc, l.unsqueeze(-1), out=acc)
        out[:, r0:r1] = acc
        lse[:, r0:r1] = m + l.log()
        if dead.any():
            lse[:, r0:r1].masked_fill_(dead, neg_inf)
    return out, lse


def _backward_rows(qs, k, v, do, lse, delta, G, plan, scale, bias_rows=None, dbias_rows=None):
    """Recompute tiles and return (dq, dk, dv) on row layout.

    delta = rowsum(dO * O) - dL; lse is the full row log-sum-exp (global in ring attention).
    dbias_rows, when given, is a (B, Hkv, G, Tq, Tk) tensor that receives dS.
    """
    dq = torch.zeros_like(qs)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    lse_safe = lse.masked_fill(lse == float("-inf"), float("inf")).unsqueeze(-1)
    delta = delta.unsqueeze(-1)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    for q0, q1 in plan.q_blocks():
        r0, r1 = q0 * G, q1 * G
        qi, doi = qs[:, r0:r1], do[:, r0:r1]
        li, di = lse_safe[:, r0:r1], delta[:, r0:r1]
        dqi = None
        for k0, k1 in plan.k_chunks(q0, q1):
            if plan.skip(q0, q1, k0, k1):
                continue
            S = torch.bmm(qi, kt[:, :, k0:k1])
            if bias_rows is not None:
                S += _bias_tile(bias_rows, q0, q1, k0, k1, G)
            _apply(S, plan.mask(q0, q1, k0, k1), G, plan.seg_mask(q0, q1, k0, k1))
            P = S.sub_(li).exp_()
            dv[:, k0:k1].baddbmm_(P.transpose(1, 2), doi)
            dS = torch.bmm(doi, vt[:, :, k0:k1]).sub_(di).mul_(P)
            if dbias_rows is not None:
                nq = q1 - q0
                dbias_rows[:, :, :, q0:q1, k0:k1] = dS.view(dbias_rows.shape[0], dbias_rows.shape[1], nq, G, k1 - k0).permute(
                    0, 1, 3, 2, 4
                )
            if dqi is None:
                dqi = torch.bmm(dS, k[:, k0:k1])
            else:
                dqi.baddbmm_(dS, k[:, k0:k1])
            dk[:, k0:k1].baddbmm_(dS.transpose(1, 2), qi)  # qi already carries the scale
        if dqi is not None:
            dq[:, r0:r1] = dqi.mul_(scale)
    return dq, dk, dv


def _prepare(q, k, v, causal, scale, bias, window, block_q, block_k, q_offset=None, segment_ids=None):
    _check(q, k, v, window)
    B, H, Tq, D = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    G = H // n_kv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = _Plan(Tq, Tk, causal, window, block_q, block_k, q.device, q_offset, segment_ids)
    bias_rows = None
    if bias is not None:
        bias_rows = bias.to(torch.float32 if q.dtype != torch.float64 else q.dtype).expand(B, H, Tq, Tk).unflatten(1, (n_kv, G))
    return B, H, Tq, Tk, n_kv, G, scale, plan, bias_rows


def _work_dtype(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _FlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, causal, scale, window, block_q, block_k, q_offset, segment_ids):
        B, H, Tq, Tk, n_kv, G, scale, plan, bias_rows = _prepare(q, k, v, causal, scale, bias, window, block_q, block_k, q_offset, segment_ids)
        q32, k32, v32 = _work_dtype(q), _work_dtype(k), _work_dtype(v)
        qs = _to_rows(q32, n_kv) * scale
        k3 = k32.reshape(B * n_kv, Tk, -1)
        v3 = v32.reshape(B * n_kv, Tk, -1)
        out3, lse3 = _forward_rows(qs, k3, v3, G, plan, bias_rows)
        out = _from_rows(out3, B, H, Tq)
        lse = _from_rows(lse3, B, H, Tq)
        ctx.save_for_backward(q, k, v, bias, out, lse, segment_ids)
        ctx.cfg = (causal, scale, window, block_q, block_k, q_offset)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse, segment_ids = ctx.saved_tensors
        causal, scale, window, block_q, block_k, q_offset = ctx.cfg
        dq, dk, dv, dbias = flash_backward(
            q, k, v, out, lse, dout, dlse, causal=causal, scale=scale, bias=bias, window=window,
            block_q=block_q, block_k=block_k, need_dbias=bias is not None and ctx.needs_input_grad[3], q_offset=q_offset,
            segment_ids=segment_ids,
        )
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


def flash_backward(q, k, v, out, lse, dout, dlse=None, *, causal=True, scale=None, bias=None, window=None,
                   block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, need_dbias=False, delta=None, q_offset=None, segment_ids=None):
    """Gradients (dq, dk, dv, dbias) of attention given the saved output and log-sum-exp.

    ``lse`` may be the log-sum-exp over more keys than ``k`` holds (ring attention): the
    gradient is then the contribution of these keys. ``delta`` (B, H, Tq) overrides
    rowsum(dout * out) - dlse.
    """
    B, H, Tq, Tk, n_kv, G, scale, plan, bias_rows = _prepare(q, k, v, causal, scale, bias, window, block_q, block_k, q_offset, segment_ids)
    q32, k32, v32 = _work_dtype(q), _work_dtype(k), _work_dtype(v)
    wd = q32.dtype
    dout = dout.to(wd) if dout is not None else torch.zeros_like(q32)
    if delta is None:
        delta = (dout * out.to(wd)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(wd)
    qs = _to_rows(q32, n_kv) * scale
    k3 = k32.reshape(B * n_kv, Tk, -1)
    v3 = v32.reshape(B * n_kv, Tk, -1)
    dbias_rows = None
    if need_dbias:
        dbias_rows = torch.zeros(B, n_kv, G, Tq, Tk, dtype=wd, device=q.device)
    dq3, dk3, dv3 = _backward_rows(
        qs, k3, v3, _to_rows(dout, n_kv), _to_rows(lse.to(wd).unsqueeze(-1), n_kv).squeeze(-1),
        _to_rows(delta.to(wd).unsqueeze(-1), n_kv).squeeze(-1), G, plan, scale, bias_rows, dbias_rows,
    )
    dq = _from_rows(dq3, B, H, Tq).to(q.dtype)
    dk = dk3.view_as(k32).to(k.dtype)
    dv = dv3.view_as(v32).to(v.dtype)
    dbias = None
    if dbias_rows is not None:
        dbias = dbias_rows.flatten(1, 2).sum_to_size(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias


def _use_triton(q, v, bias, backend):
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if not q.is_cuda or bias is not None:
        return False
    from adl_cli.nn.attention import flash_triton

    return flash_triton.available() and flash_triton.supports(q, v)


def flash_attention_with_lse(q, k, v, *, causal=True, scale=None, bias=None, window=None,
                             block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, backend="auto", q_offset=None, segment_ids=None):
    """(out (B, H, Tq, D), lse (B, H, Tq)); lse = logsumexp of the scaled, masked scores.

    Both outputs are differentiable, so partial results over key blocks can be merged by
    their log-sum-exp under autograd (ring and tree attention). ``q_offset``: the position of
    the first query among the keys (default Tk - Tq, end-aligned; see mask.py). ``segment_ids``
    (B, T): packed documents attend within themselves (the tiled path, on every device).
    """
    if q_offset is not None and int(q_offset) == k.shape[2] - q.shape[2]:
        q_offset = None
    if q_offset is None and segment_ids is None and _use_triton(q, v, bias, backend):
        from adl_cli.nn.attention import flash_triton

        if bias is not None:
            raise ValueError("bias is not supported by the triton flash kernel; use backend='torch'")
        return flash_triton.triton_attention_with_lse(q, k, v, causal=causal, scale=scale, window=window)
    return _FlashFunction.apply(q, k, v, bias, causal, scale, window, int(block_q), int(block_k), q_offset, segment_ids)


@ATTENTION.register("flash")
def flash_attention(q, k, v, *, causal=True, scale=None, bias=None, window=None, q_offset=None, segment_ids=None,
                    block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, backend="auto"):
    return flash_attention_with_lse(
        q, k, v, causal=causal, scale=scale, bias=bias, window=window, block_q=block_q, block_k=block_k, backend=backend,
        q_offset=q_offset, segment_ids=segment_ids,
    )[0]
