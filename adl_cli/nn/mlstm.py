"""The mLSTM cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"): a matrix
memory with a covariance update and exponential input gates, three ways that compute the same
function.

Per head, with q, k, v (d each; k already scaled by 1 / sqrt(d)), input gate i_t = exp(i~_t),
forget gate f_t = sigmoid(f~_t):

    C_t = f_t C_{t-1} + i_t v_t k_t^T,   n_t = f_t n_{t-1} + i_t k_t,
    h_t = C_t q_t / max(|n_t . q_t|, 1)

The exponential gate overflows, so every form carries a stabiliser m and stores C, n scaled by
exp(-m); the normaliser's floor 1 becomes exp(-m), and the outputs do not depend on m:

    mlstm_recurrent  the loop: m_t = max(log f_t + m_{t-1}, i~_t) (the decode step)
    mlstm_parallel   as masked attention: D[t, s] = log f_{s+1} + ... + log f_t + i~_s,
                     m_t = max_s D[t, s], h = ((q k^T) o exp(D - m)) v / max(|row sum|, exp(-m))
    mlstm_chunkwise  chunks of Q positions: the parallel form inside a chunk plus the state
                     carried in from the chunks before (C, n, m), updated at each chunk's end

Shapes: q, k, v (b, h, l, d); i_pre, f_pre (b, h, l); a state (C (b, h, d, d) [value x key],
n (b, h, d), m (b, h)). The recurrent and chunkwise forms take and return a state; the parallel
form starts from zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adl_cli.nn.ssd import segment_sums


def zero_state(q: torch.Tensor):
    b, h, _, d = q.shape
    return q.new_zeros(b, h, d, d), q.new_zeros(b, h, d), q.new_zeros(b, h)


def mlstm_recurrent(q, k, v, i_pre, f_pre, state=None):
    C, n, m = zero_state(q) if state is None else state
    log_f = F.logsigmoid(f_pre)
    out = []
    for t in range(q.shape[2]):
        m_new = torch.maximum(log_f[..., t] + m, i_pre[..., t])
        fa, ia = torch.exp(log_f[..., t] + m - m_new), torch.exp(i_pre[..., t] - m_new)
        kt, vt, qt = k[:, :, t], v[:, :, t], q[:, :, t]
        C = fa[..., None, None] * C + ia[..., None, None] * vt[..., :, None] * kt[..., None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        den = torch.maximum((n * qt).sum(-1).abs(), torch.exp(-m_new))
        out.append((C @ qt[..., None]).squeeze(-1) / den[..., None])
        m = m_new
    return torch.stack(out, 2), (C, n, m)


def mlstm_parallel(q, k, v, i_pre, f_pre):
    D = segment_sums(F.logsigmoid(f_pre)) + i_pre[..., None, :]  # (b, h, t, s)
    m = D.amax(-1, keepdim=True)
    S = (q @ k.transpose(-1, -2)) * torch.exp(D - m)
    den = torch.maximum(S.sum(-1, keepdim=True).abs(), torch.exp(-m))
    return (S @ v) / den


def mlstm_chunkwise(q, k, v, i_pre, f_pre, state=None, chunk: int = 32):
    if chunk < 1:
        raise ValueError(f"the mLSTM chunk must be >= 1, got {chunk}")
    C, n, m = zero_state(q) if state is None else state
    log_f = F.logsigmoid(f_pre)
    out = []
    for start in range(0, q.shape[2], chunk):
        span = slice(start, start + chunk)
        qc, kc, vc, ic, lf = q[:, :, span], k[:, :, span], v[:, :, span], i_pre[..., span], log_f[..., span]
        cum = lf.cumsum(-1)  # log f from the chunk's start through t
        inner = segment_sums(lf) + ic[..., None, :]  # (b, h, t, s) within the chunk
        carried = cum + m[..., None]  # the log weight of the state carried in
        m_t = torch.maximum(carried, inner.amax(-1))
        S = (qc @ kc.transpose(-1, -2)) * torch.exp(inner - m_t[..., None])
        scale = torch.exp(carried - m_t)
        num = S @ vc + scale[..., None] * (qc @ C.transpose(-1, -2))
        den = torch.maximum((S.sum(-1) + scale * (qc @ n[..., None]).squeeze(-1)).abs(), torch.exp(-m_t))
        out.append(num / den[..., None])
        total = cum[..., -1]  # the whole chunk's log decay
        to_end = total[..., None] - cum + ic  # the log weight of position s in the end state
        m_new = torch.maximum(total + m, to_end.amax(-1))
        decay, w = torch.exp(total + m - m_new), torch.exp(to_end - m_new[..., None])
        C = decay[..., None, None] * C + (vc * w[..., None]).transpose(-1, -2) @ kc
        n = decay[..., None] * n + (kc * w[..., None]).sum(-2)
        m = m_new
    return torch.cat(out, 2), (C, n, m)


MLSTM_FORMS = ("chunkwise", "parallel", "recurrent")
