"""``adl quantize --method``: METHODS maps a name to how one ``nn.Linear`` becomes a quantized layer.

    int8         absmax int8, one scale a row (``--group-size`` for groups); ``--grid zero-point``
    int4         zero-point int4, groups of 128 (``--grid absmax`` for symmetric)
    nf4 / fp4    bitsandbytes' 4-bit NF4 / FP4, blocks of 64 (``--double-quant``)
    nf4-adl      adl's own NF4 (the same codebook, computed here), blocks of 64
    llm-int8     LLM.int8() through bitsandbytes: int8 rows, outlier input columns in floating point
    gptq         adl's GPTQ: inverse-Hessian error feedback on calibration inputs (``--act-order``)
    awq          AWQ's activation-aware input scales searched on calibration inputs, zero-point 4-bit
    smoothquant  SmoothQuant W8A8: migration scales from calibration absmaxes (``--alpha``)
    w8a8         int8 weights and per-token int8 activations without smoothing (their baseline)
    hqq          HQQ's calibration-free zero points, groups of 64

A method that reads activations names the statistics it needs (``stats``: "hessian", "absmax",
"rows"); adl_cli/quantization/apply.py gathers them on calibration text, stage by stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from adl_cli.quantization import activation, grids
from adl_cli.quantization.bnb import Bnb4Linear, BnbInt8Linear
from adl_cli.quantization.gptq import gptq
from adl_cli.quantization.linear import GridLinear, QuantizedLinear, W8A8Linear, int8_per_token
from adl_cli.registry import Registry

GRIDS = ("absmax", "zero-point")


@dataclass
class QuantOptions:
    group_size: int | None = None  # None: the method's default; 0: one group a row
    bits: int | None = None  # gptq / awq / hqq: 4 or 8
    grid: str | None = None  # int8 / int4: absmax or zero-point
    act_order: bool = False  # gptq
    damp: float = 0.01  # gptq: dampening, x the Hessian's mean diagonal
    alpha: float = 0.5  # smoothquant migration strength
    threshold: float = 6.0  # llm-int8 outlier threshold
    double_quant: bool = False  # nf4 / fp4
    head: bool = False  # quantize the output head too
    calib_samples: int = 128  # calibration windows
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Method:
    name: str
    summary: str
    default_group: int
    build: Callable[[nn.Linear, dict, QuantOptions, int], QuantizedLinear]  # (linear, stats, options, group size)
    stats: tuple[str, ...] = ()
    bits_choices: tuple[int, ...] = ()  # --bits allowed (empty: fixed)
    default_bits: int = 4
    grid_default: str | None = None  # --grid allowed when set
    options: tuple[str, ...] = field(default_factory=tuple)  # method-only options it reads
    # (stage targets, their stats, options, group size) -> {name: layer}: a stage built together
    build_stage: Callable[[list, dict, QuantOptions, int], dict[str, QuantizedLinear]] | None = None

    def bits(self, opts: QuantOptions) -> int:
        return opts.bits or self.default_bits

    def group(self, opts: QuantOptions) -> int:
        return self.default_group if opts.group_size is None else opts.group_size


METHODS = Registry("quantization method")


def _register(method: Method) -> Method:
    METHODS.register(method.name)(method)
    return method


def _weight(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().cpu()


def _grid(linear, opts, group, bits, default_grid):
    grid = opts.grid or default_grid
    q = grids.symmetric(_weight(linear), bits, group) if grid == "absmax" else grids.asymmetric(_weight(linear), bits, group)
    return GridLinear(q, linear.bias)


_register(Method("int8", "absmax int8, a scale a row (round to nearest)", 0,
                 lambda lin, st, o, g: _grid(lin, o, g, 8, "absmax"), default_bits=8, grid_default="absmax"))
_register(Method("int4", "zero-point int4 in groups (round to nearest)", 128,
                 lambda lin, st, o, g: _grid(lin, o, g, 4, "zero-point"), default_bits=4, grid_default="zero-point"))
_register(Method("nf4", "bitsandbytes NF4 in blocks", 64,
                 lambda lin, st, o, g: Bnb4Linear.quantize(lin, quant_type="nf4", group_size=g, double_quant=o.double_quant),
                 options=("double_quant",)))
_register(Method("fp4", "bitsandbytes FP4 in blocks", 64,
                 lambda lin, st, o, g: Bnb4Linear.quantize(lin, quant_type="fp4", group_size=g, double_quant=o.double_quant),
                 options=("double_quant",)))
_register(Method("nf4-adl", "adl's own NF4 in blocks", 64, lambda lin, st, o, g: GridLinear(grids.nf4(_weight(lin), g), lin.bias)))
_register(Method("llm-int8", "LLM.int8(): int8 rows + float outlier columns (bitsandbytes)", 0,
                 lambda lin, st, o, g: BnbInt8Linear.quantize(lin, threshold=o.threshold), default_bits=8, options=("threshold",)))


def _gptq(lin, stats, opts, group):
    q = gptq(_weight(lin), stats["hessian"], bits=opts.bits or 4, group_size=group, damp=opts.damp, act_order=opts.act_order)
    return GridLinear(q, lin.bias)


def _awq_layer(lin, x, scales, bits, group):
    scaled = _weight(lin) * scales
    ratio = activation.awq_clip(x / scales, scaled, bits=bits, group_size=group)
    return GridLinear(grids.asymmetric(scaled, bits, group, clip=ratio), lin.bias, input_scale=scales.clone())  # one tensor a layer


def _awq(lin, stats, opts, group):
    """One layer on its own: the scale searched on the layer's output error."""
    bits, x = opts.bits or 4, stats["rows"]
    scales, _alpha = activation.awq_scales(x, _weight(lin), bits=bits, group_size=group)
    return _awq_layer(lin, x, scales, bits, group)


def _awq_stage(stage, stats, opts, group):
    """A block: the layers that share one input share one scale, searched on the output of the module
    that holds them (activation.awq_block_scales); a layer without recorded block inputs (the
    output head) falls back to its own output error. Clipping stays per layer and group."""
    bits, built, done = opts.bits or 4, {}, set()
    by_name = {t.name: t for t in stage}
    for t in stage:
        if t.name in done:
            continue
        st = stats.get(t.name, {})
        if not st.get("scope"):
            built[t.name] = _awq(t.linear, st, opts, group)
            done.add(t.name)
            continue
        members = [by_name[n] for n in st["shares_input_with"] if n not in done]
        probe = activation.BlockProbe(t.parent, [m.linear for m in members], st["scope"])
        scales, _alpha = activation.awq_block_scales(probe, st["rows"], bits=bits, group_size=group)
        for m in members:
            built[m.name] = _awq_layer(m.linear, stats[m.name]["rows"], scales, bits, group)
            done.add(m.name)
    return built


def _smoothquant(lin, stats, opts, group):
    w = _weight(lin)
    s = activation.smoothquant_scales(stats["absmax"], w, opts.alpha)
    qw, sw = int8_per_token(w * s)
    return W8A8Linear(qw, sw, s, lin.bias)


def _w8a8(lin, stats, opts, group):
    qw, sw = int8_per_token(_weight(lin))
    return W8A8Linear(qw, sw, torch.ones(lin.in_features), lin.bias)


def _hqq(lin, stats, opts, group):
    return GridLinear(grids.hqq(_weight(lin), opts.bits or 4, group), lin.bias)


_register(Method("gptq", "GPTQ: inverse-Hessian error feedback on calibration text", 128, _gptq, stats=("hessian",),
                 bits_choices=(4, 8), options=("act_order", "damp")))
_register(Method("awq", "AWQ: activation-aware input scales, zero-point groups", 128, _awq, stats=("rows", "scope"), bits_choices=(4, 8),
                 build_stage=_awq_stage))
_register(Method("smoothquant", "SmoothQuant W8A8: int8 weights and activations", 0, _smoothquant, stats=("absmax",), default_bits=8,
                 options=("alpha",)))
_register(Method("w8a8", "W8A8 without smoothing: the baseline of smoothquant and llm-int8", 0, _w8a8, default_bits=8))
_register(Method("hqq", "HQQ: calibration-free zero points (half-quadratic)", 64, _hqq, bits_choices=(4, 8)))
