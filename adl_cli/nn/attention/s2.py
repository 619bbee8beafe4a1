"""Shifted sparse attention (S2-Attn) from LongLoRA (Chen et al., "LongLoRA: Efficient
Fine-tuning of Long-Context Large Language Models", 2023), for training at long context.

The sequence of T tokens is cut into T / G groups of G tokens and attention runs inside
each group only (cost O(T G) instead of O(T^2)). Half of the heads use groups shifted by
G / 2 (tokens rolled by -G/2 before grouping, rolled back after), so information flows
between neighbouring groups::

    heads [0, H - H/2):  groups [0, G), [G, 2G), ...
    heads [H - H/2, H):  groups [G/2, 3G/2), ..., and the wrapped group {T - G/2.., 0..G/2 - 1}

Causal masking inside a group uses the tokens' original positions, so the wrapped group
never lets a token attend to its future (a plain roll + causal mask would). With G >= T
there is a single group and S2-Attn is exactly full causal attention. As in LongLoRA,
S2-Attn is a training-time approximation: decoding (Tq != Tk) uses full attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adl_cli.nn.attention import ATTENTION
from adl_cli.nn.attention.naive import expand_kv


def _grouped(q, k, v, G, causal, scale):
    """Attention inside consecutive groups of G tokens. q, k, v: (B, h, T, D), T % G == 0."""
    B, h, T, D = q.shape
    shape = (B, h * (T // G), G, D)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=causal, scale=scale
    )
    return out.reshape(B, h, T, D)


def _shifted(q, k, v, G, causal, scale):
    """Attention inside groups shifted by G // 2, the last group wrapping around."""
    B, h, T, D = q.shape
    s = G // 2
    q, k, v = (x.roll(-s, dims=2) for x in (q, k, v))
    head = _grouped(q[:, :, : T - G], k[:, :, : T - G], v[:, :, : T - G], G, causal, scale) if T > G else None
    mask = None
    if causal:  # original positions of the wrapped group: T - s, ..., T - 1, 0, ..., G - s - 1
        pos = (torch.arange(T - G, T, device=q.device) + s) % T
        mask = pos[None, :] <= pos[:, None]
    tail = F.scaled_dot_product_attention(q[:, :, T - G :], k[:, :, T - G :], v[:, :, T - G :], attn_mask=mask, scale=scale)
    out = tail if head is None else torch.cat((head, tail), dim=2)
    return out.roll(s, dims=2)


@ATTENTION.register("s2")
def s2_attention(q, k, v, *, causal=True, scale=None, bias=None, window=None, group=None):
    if group is None or int(group) < 2:
        raise ValueError(f"s2 attention needs group=G >= 2 (tokens per group), got {group}")
    if window is not None:
        raise ValueError("s2 attention does not take window")
    if bias is not None:
        raise ValueError("s2 attention does not take a score bias (ALiBi); use rope or learned positions")
    G = int(group)
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv(k, H), expand_kv(v, H)
    if Tq != Tk or Tq <= G or Tq % G:
        # decoding, a single group, or a prompt that is not a whole number of groups: full attention,
        # which is what LongLoRA uses at inference (S2 is a training-time approximation; recipes are
        # checked to train on multiples of the group)
        if Tq != Tk and causal:
            from adl_cli.nn.attention.sdpa import sdpa_attention

            return sdpa_attention(q, k, v, causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    n_shift = H // 2
    plain = _grouped(q[:, : H - n_shift], k[:, : H - n_shift], v[:, : H - n_shift], G, causal, scale)
    if n_shift == 0:
        return plain
    shifted = _shifted(q[:, H - n_shift :], k[:, H - n_shift :], v[:, H - n_shift :], G, causal, scale)
    return torch.cat((plain, shifted), dim=1)


def _check_s2_options(options: dict, block_size: int) -> None:
    group = options.get("group")
    if group is None:
        raise ValueError("model.attention = 's2' needs model.attention_options.group (tokens per group, >= 2)")
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or block_size % group:
        raise ValueError(f"model.attention_options.group must be an integer >= 2 that divides model.block_size ({block_size}), got {group!r}")


s2_attention.check_options = _check_s2_options
s2_attention.refused = ("window",)
