"""The attention mask, built in one place for every kernel.

A query at absolute position i may see a key at position j when

    causal:         j <= i
    window W:       i - j < W            (and j - i < W without causal: a symmetric band)
    segments:       seg(i) == seg(j)     (documents packed into one row never see each other)

Positions: the Tq queries sit at q_offset, ..., q_offset + Tq - 1 among the Tk keys at
0, ..., Tk - 1. ``q_offset`` defaults to Tk - Tq (end-aligned: a chunk of new queries after a
cache of earlier keys); a cache view longer than what is filled passes its own offset.
"""

from __future__ import annotations

import torch


def positions(tq: int, tk: int, q_offset: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    off = tk - tq if q_offset is None else int(q_offset)
    return torch.arange(off, off + tq, device=device), torch.arange(tk, device=device)


def allowed_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window: int | None,
                  q_seg: torch.Tensor | None = None, k_seg: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask of allowed (query, key) pairs: (Tq, Tk), or (B, 1, Tq, Tk) with segment ids
    (q_seg: (B, Tq), k_seg: (B, Tk)); None when every pair is allowed."""
    allowed = None
    qp, kp = q_pos[:, None], k_pos[None, :]
    if causal:
        allowed = kp <= qp
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        band = (qp - kp) < window
        if not causal:
            band &= (kp - qp) < window
        allowed = band if allowed is None else allowed & band
    if q_seg is not None:
        same = (q_seg[:, :, None] == k_seg[:, None, :]).unsqueeze(1)  # (B, 1, Tq, Tk)
        allowed = same if allowed is None else same & allowed
    return allowed


def attention_mask(tq: int, tk: int, *, causal: bool, window: int | None = None, q_offset: int | None = None,
                   segment_ids: torch.Tensor | None = None, device=None) -> torch.Tensor | None:
    """The mask of a whole (Tq, Tk) score matrix; ``segment_ids`` (B, T) need Tq == Tk."""
    q_pos, k_pos = positions(tq, tk, q_offset, device)
    seg_q = seg_k = None
    if segment_ids is not None:
        if tq != tk:
            raise ValueError("segment_ids (packed documents) apply to self-attention over the whole sequence (Tq == Tk)")
        seg_q = seg_k = segment_ids
    return allowed_pairs(q_pos, k_pos, causal=causal, window=window, q_seg=seg_q, k_seg=seg_k)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each packed document starts: (B, T) from (B, T) segment ids
    (a document is a run of equal ids)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
