"""Sliding-window attention: each query sees only the last ``window`` keys (a band mask).

    out_i = sum_{j : 0 <= i - j < W} softmax_j(q_i k_j^T / sqrt(d)) v_j      (causal)

Beltagy, Peters, Cohan, "Longformer" (2020); used causally by Mistral 7B (Jiang et al.,
2023). Cost O(T W) time and O(T block) memory: this kernel runs adl's tiled flash
attention (``flash.py``), whose planner visits only the key tiles that intersect the
band, so tiles left of the band are never computed nor stored. (torch 2.13's
``flex_attention`` with a block mask was considered: run eagerly on CPU it materialises
the full score matrix, and compiled it costs a C++ build per shape, so it is not used.)
Without ``causal`` the band is symmetric: |i - j| < W.
"""

from __future__ import annotations

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention_with_lse


@ATTENTION.register("window")
def window_attention(q, k, v, *, causal=True, scale=None, bias=None, window=None, q_offset=None, segment_ids=None,
                     block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, backend="auto"):
    if window is None:
        raise ValueError("window attention needs window=W (keys at most W - 1 positions behind the query)")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return flash_attention_with_lse(
        q, k, v, causal=causal, scale=scale, bias=bias, window=int(window),
        block_q=block_q, block_k=block_k, backend=backend, q_offset=q_offset, segment_ids=segment_ids,
    )[0]


def _check_window_options(options: dict, block_size: int) -> None:
    window = options.get("window")
    if window is None:
        raise ValueError("model.attention = 'window' needs model.attention_options.window (keys at most W - 1 positions behind the query)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"model.attention_options.window must be an integer >= 1, got {window!r}")


window_attention.check_options = _check_window_options
