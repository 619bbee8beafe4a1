"""``--quant int8|int4`` of adl generate, chat, eval and bench-inference: a float run's linear
layers quantized as it loads, round to nearest, the output head included (decoding multiplies by
it every token). Weight-only, for decoding, not training or the fused loss.

    int8:  absmax, one scale a row (adl quantize --method int8)
    int4:  zero-point, groups of 32 (adl quantize --method int4 --group-size 32)

The layers and their kernels are adl_cli/quantization/linear.py's; ``adl quantize`` writes the same
layers (and the other methods') to a quantized run folder that loads without ``--quant``.
"""

from __future__ import annotations

from torch import nn

from adl_cli.errors import AdlError, opt

SCHEMES = ("int8", "int4")


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 32) -> int:
    """Replace the model's linear layers by quantized ones in place; returns how many were replaced.
    A head tied to the token embedding gets its own quantized copy (the embedding keeps the float
    table, of which decoding reads one row a token)."""
    from adl_cli.quantization.apply import quantize_model as quantize
    from adl_cli.quantization.linear import QuantizedLinear
    from adl_cli.quantization.methods import QuantOptions

    if scheme not in SCHEMES:
        raise AdlError(f"{opt('quant')} must be one of {', '.join(SCHEMES)}, got '{scheme}'")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise AdlError(f"{opt('quant')}: the run is already quantized (adl quantize wrote it); load it without {opt('quant')}")
    try:
        specs, _ = quantize(model, scheme, QuantOptions(head=True, group_size=0 if scheme == "int8" else group_size))
    except AdlError as e:
        raise AdlError(f"{opt('quant')} {scheme}: {e.args[0]}") from None
    return len(specs)
