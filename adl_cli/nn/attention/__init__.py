"""Attention kernels by name.

Every kernel has one signature::

    kernel(q, k, v, *, causal=True, scale=None, bias=None, window=None) -> out

q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query
attention: each group of H // Hkv query heads shares one key/value head).
causal masking is aligned to the end: query i sits at absolute position Tk - Tq + i,
so a decoding step with a KV cache (Tq < Tk) masks correctly. ``bias`` is an additive
score bias broadcastable to (B, H, Tq, Tk) (ALiBi); ``window`` keeps only keys at most
``window - 1`` positions behind the query (sliding-window attention).
A kernel that cannot honour an argument raises ValueError naming it.

Block-level attention modules that change the projections themselves (multi-head
latent attention) live in ``ATTENTION_BLOCKS``; kernels live in ``ATTENTION``.
"""

from adl_cli.registry import Registry

ATTENTION = Registry("attention")
ATTENTION_BLOCKS = Registry("attention block")

# Importing the modules registers their kernels.
from adl_cli.nn.attention import flash, naive, ring, s2, sdpa, tree, window  # noqa: E402,F401
from adl_cli.nn.attention import mla  # noqa: E402,F401  (registers the "mla" block)

__all__ = ["ATTENTION", "ATTENTION_BLOCKS"]
