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

# options a kernel must be given (no usable default), with what they mean
REQUIRED = {"window": {"window": "keys at most W - 1 positions behind the query"}, "s2": {"group": "tokens per group, >= 2"}}
_CALL_ARGS = ("causal", "scale", "bias")  # set by the model, not by a recipe
REFUSED = {"ring": ("window",), "s2": ("window",)}  # in the one signature, but these kernels refuse them


def kernel_options(name: str) -> dict:
    """The recipe options a kernel takes, with their defaults (None: required or off)."""
    import inspect

    params = inspect.signature(ATTENTION.get(name)).parameters
    skip = _CALL_ARGS + REFUSED.get(name, ())
    return {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in skip}


def check_options(name: str, options: dict, block_size: int) -> None:
    """Refuse, when the recipe is read, options a kernel does not take or lacks (ValueError)."""
    from adl_cli.errors import closest

    if name in ATTENTION_BLOCKS:
        allowed = getattr(__import__(ATTENTION_BLOCKS.get(name).__module__, fromlist=["OPTIONS"]), "OPTIONS", {})
    else:
        allowed = kernel_options(name)
    for key in options:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise ValueError(f"model.attention_options: '{name}' has no option '{key}'{closest(key, allowed)}; its options: {valid}")
    for key, meaning in REQUIRED.get(name, {}).items():
        if options.get(key) is None:
            raise ValueError(f"model.attention = '{name}' needs model.attention_options.{key} ({meaning})")
    if name == "window" and (not isinstance(options["window"], int) or options["window"] < 1):
        raise ValueError(f"model.attention_options.window must be an integer >= 1, got {options['window']!r}")
    if name == "s2":
        group = options["group"]
        if not isinstance(group, int) or group < 2 or block_size % group:
            raise ValueError(f"model.attention_options.group must be an integer >= 2 that divides model.block_size ({block_size}), got {group!r}")
    if name == "ring":
        world = options.get("world", 4)
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"model.attention_options.world must be an integer >= 1, got {world!r}")


def describe_options() -> str:
    """One line per kernel: its recipe options and defaults (for --help and the README)."""
    lines = []
    for name in ATTENTION.names():
        opts = kernel_options(name)
        text = ", ".join(f"{k}={'(required)' if k in REQUIRED.get(name, {}) else v!r}" for k, v in opts.items()) or "no options"
        lines.append(f"{name}: {text}")
    return "\n".join(lines)


__all__ = ["ATTENTION", "ATTENTION_BLOCKS", "check_options", "kernel_options", "describe_options"]
