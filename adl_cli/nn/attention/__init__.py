"""Attention kernels by name.

Every kernel has one signature::

    kernel(q, k, v, *, causal=True, scale=None, bias=None, window=None, q_offset=None, segment_ids=None) -> out

q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query
attention: each group of H // Hkv query heads shares one key/value head).
causal masking is aligned to the end: query i sits at absolute position Tk - Tq + i,
so a decoding step with a KV cache (Tq < Tk) masks correctly; ``q_offset`` places the
queries elsewhere, and ``segment_ids`` (B, T) keep packed documents apart. Kernels that
take these two declare them as parameters (naive, sdpa, flash, window);
the mask itself is built in one place, ``mask.py``. ``bias`` is an additive
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

_CALL_ARGS = ("causal", "scale", "bias", "q_offset", "segment_ids")  # set by the model, not by a recipe


def kernel_options(name: str) -> dict:
    """The recipe options a kernel (or block) takes, with their defaults.

    A kernel's options are its keyword-only parameters beyond the call arguments, less the
    ones it declares it refuses (``kernel.refused``); a block lists them in ``OPTIONS``."""
    import inspect

    if name in ATTENTION_BLOCKS:
        return dict.fromkeys(ATTENTION_BLOCKS.get(name).OPTIONS)
    fn = ATTENTION.get(name)
    skip = _CALL_ARGS + tuple(getattr(fn, "refused", ()))
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in skip}


def check_options(name: str, options: dict, block_size: int) -> None:
    """Refuse, when the recipe is read, options a kernel does not take (ValueError naming the valid
    ones); then the kernel's own ``check_options(options, block_size)``, if it has one, checks values."""
    from adl_cli.errors import closest

    allowed = kernel_options(name)
    for key in options:
        if key not in allowed:
            raise ValueError(f"model.attention_options: '{name}' has no option '{key}'{closest(key, allowed)}; its options: {', '.join(allowed) or 'none'}")
    target = ATTENTION_BLOCKS.get(name) if name in ATTENTION_BLOCKS else ATTENTION.get(name)
    own = getattr(target, "check_options", None)
    if own is not None:
        own(options, block_size)


__all__ = ["ATTENTION", "ATTENTION_BLOCKS", "check_options", "kernel_options"]