"""Fused linear + cross-entropy: the loss of softmax(h W^T) without the full logits tensor.

For N rows of hidden states h (N, C), an output matrix W (V, C) and M rows whose target
is not ignored, the mean token loss and its gradients are, row by row,

    L = (1/M) sum_n [ logsumexp(h_n W^T) - (h_n W^T)[y_n] ]
    dL/dlogits = (softmax(h W^T) - onehot(y)) / M       (zero on ignored rows)
    dL/dh = dlogits W,        dL/dW = dlogits^T h

Computing them chunk by chunk during the forward pass keeps only a (chunk, V) slice of
logits alive instead of (N, V): at N = 2048 and V = 50304 that is 412 MB per tensor saved
several times over. The matmul FLOPs equal the unfused forward + backward, so nothing is
recomputed; the gradients wait in the autograd context and are scaled by the incoming
gradient in backward. (The same idea as Liger-Kernel's fused linear cross-entropy.)

How a chunk is processed (fp32, the fast path on CPUs without AMX):

    buf  = h_c W^T                      one (rows, V) buffer, reused by every chunk
    buf  = log_softmax(buf)  in place   one fused row-wise kernel; loss -= buf[n, y_n]
    buf  = exp(buf) - onehot(y)         in place: the unscaled dlogits
    dh_c = buf W;  dW (+)= buf^T (h_c * valid)

The 1/M (and the incoming gradient) multiply dh and dW once, in backward, instead of every
element of every chunk; ignored rows are zeroed in h_c and dh_c (rows x C), not in buf.
Chunk size: bigger chunks feed the matmuls better (on 2 CPU threads h_c W^T with C = 384
runs at 152 GFLOP/s for 256 rows, 178 for 1024 and 186 for 2048, against a 2048^3 peak of
~195) and accumulate dW in fewer passes; the buffer costs rows x V x 4 bytes (206 MB at
1024 x 50304). 1024 rows is the default.
With ``softcap = c`` the logits are c tanh(s / c) (Gemma 2's soft-capping) and the chunk's
dlogits carry the factor 1 - tanh^2(s / c) (one more (rows, V) buffer).
The loss is exact fp32 cross-entropy: it matches ``F.cross_entropy`` on materialised
logits to rounding. Under autocast (or with low-precision inputs) the matmuls run in the
autocast dtype and the softmax in fp32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunked(h, weight, targets, chunk_rows: int, ignore_index: int, need_h: bool, need_w: bool, softcap: float = 0.0):
    """(summed loss, 1/M, unscaled dL/dh * M or None, unscaled dL/dW * M or None)."""
    n, V = h.shape[0], weight.shape[0]
    dev = h.device
    ok = targets != ignore_index
    safe_y = torch.where(ok, targets, torch.zeros_like(targets))
    okf = ok.to(torch.float32)
    inv = 1.0 / okf.sum().clamp(min=1.0)  # a tensor: no host synchronisation
    cd = _compute_dtype(h, weight)
    fast = cd == torch.float32 and h.dtype == torch.float32 and weight.dtype == torch.float32
    w = weight if weight.dtype == cd else weight.to(cd)
    wt = w.t()
    rows = max(1, min(chunk_rows, n))
    buf = torch.empty(rows, V, dtype=torch.float32, device=dev)
    slope = torch.empty(rows, V, dtype=torch.float32, device=dev) if softcap and (need_h or need_w) else None
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None
    if need_w:
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev) if fast else torch.zeros(weight.shape, dtype=torch.float32, device=dev)
    total = torch.zeros((), dtype=torch.float32, device=dev)
    arange = torch.arange(rows, device=dev)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        m = stop - start
        hc = h[start:stop]
        logits = buf[:m]
        if fast:
            torch.mm(hc, wt, out=logits)
        else:
            logits.copy_(hc.to(cd) @ wt)
        if softcap:  # z = c tanh(s / c); dz/ds = 1 - tanh^2(s / c)
            logits.div_(softcap).tanh_()
            if slope is not None:
                torch.mul(logits, logits, out=slope[:m]).neg_().add_(1.0)
            logits.mul_(softcap)
        torch.log_softmax(logits, 1, out=logits)
        yc, okc = safe_y[start:stop], okf[start:stop]
        total -= torch.dot(logits.gather(1, yc[:, None]).squeeze(1), okc)
        if not (need_h or need_w):
            continue
        dlogits = logits.exp_()
        dlogits[arange[:m], yc] -= 1.0
        if slope is not None:
            dlogits.mul_(slope[:m])
        if fast:
            if need_h:
                gh = grad_h[start:stop]
                torch.mm(dlogits, w, out=gh)
                gh.mul_(okc[:, None])
            if need_w:
                hm = hc * okc[:, None]
                if start == 0:
                    torch.mm(dlogits.t(), hm, out=grad_w)
                else:
                    grad_w.addmm_(dlogits.t(), hm)
        else:
            d = dlogits.to(cd)
            if need_h:
                grad_h[start:stop] = (d @ w) * okc[:, None].to(cd)
            if need_w:
                grad_w += (d.t() @ (hc.to(cd) * okc[:, None].to(cd))).float()
    return total, inv, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, ignore_index: int, softcap: float):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, inv, grad_h, grad_w = _chunked(h, weight, targets, chunk_rows, ignore_index, need_h, need_w, softcap)
        # Intermediates, not inputs: kept on ctx so that backward can hand them over (and scale
        # them in place) instead of copying 77 MB of dW.
        ctx.grads = (grad_h, grad_w, inv)
        ctx.weight_dtype = weight.dtype
        return total * inv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice through the same loss (retain_graph=True); "
                "compute the loss again, or use loss_chunk_rows=0 for the plain loss"
            )
        grad_h, grad_w, inv = ctx.grads
        ctx.grads = None
        scale = grad_out.to(torch.float32) * inv
        if grad_h is not None:
            grad_h.mul_(scale.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int = 1024,
    ignore_index: int = -100,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``; h: (..., C), targets: (...).

    Targets equal to ``ignore_index`` count neither in the sum nor in the mean. The backward
    pass may run once per call (no ``retain_graph`` reuse)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    h2 = h.reshape(-1, h.shape[-1])
    y = targets.reshape(-1)
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        total, inv, _, _ = _chunked(h2.detach(), weight.detach(), y, chunk_rows, ignore_index, False, False, softcap)
        return total * inv
    return _FusedLinearCrossEntropy.apply(h2, weight, y, chunk_rows, ignore_index, float(softcap))
