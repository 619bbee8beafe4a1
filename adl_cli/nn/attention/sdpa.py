"""torch.nn.functional.scaled_dot_product_attention: torch's fused kernels.

Dispatches to the flash, memory-efficient or math backend (Dao et al. 2022; Rabe &
Staats 2021). ``sdpa_backend`` tells which one torch would pick for given inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.mask import attention_mask
from adl_cli.nn.attention.naive import expand_kv


@ATTENTION.register("sdpa")
def sdpa_attention(q, k, v, *, causal=True, scale=None, bias=None, window=None, q_offset=None, segment_ids=None):
    n_head, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != n_head:
        k, v = expand_kv(k, n_head), expand_kv(v, n_head)
    end_aligned = q_offset in (None, tk - tq)
    plain = bias is None and window is None and segment_ids is None and end_aligned
    if plain and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if causal and tq == 1 and window is None and segment_ids is None and end_aligned:
        # One new query after a cache sees every key: no causal mask to build (a decoding step).
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    mask = attention_mask(tq, tk, causal=causal, window=window, q_offset=q_offset, segment_ids=segment_ids, device=q.device)
    if bias is not None:
        additive = bias.to(q.dtype)
        if mask is not None:
            additive = additive.masked_fill(~mask, float("-inf"))
        mask = additive
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True) -> str:
    """Name of the backend torch selects for these inputs: flash, efficient, cudnn or math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend, name in (
        (SDPBackend.FLASH_ATTENTION, "flash"),
        (SDPBackend.CUDNN_ATTENTION, "cudnn"),
        (SDPBackend.EFFICIENT_ATTENTION, "efficient"),
    ):
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], is_causal=causal)
            return name
        except RuntimeError:
            continue
    return "math"
