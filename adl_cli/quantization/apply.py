"""A whole model through a quantization method: which layers, in what order, on what calibration.

The targets are the model's ``nn.Linear`` layers; the output head only with ``head`` (a head tied
to the token embedding then gets its own quantized copy: the embedding keeps the float table, of
which decoding reads one row a token). Calibrated methods go stage by stage, a stage being one
block (the layers named ``...h.<i>...``; layers outside blocks make the last stage): the stage's
inputs are gathered by running the calibration windows through the model whose earlier stages are
already quantized (GPTQ's sequential order: each layer corrects for the errors before it), the
forward stopped once every layer of the stage has seen its input. Per layer and as its method
asks: the Hessian 2 X^T X / n (gptq.Hessian), the per-channel absmax of X (SmoothQuant), a sample
of X's rows (AWQ's search), and ("scope") the inputs of the module that holds the layer inside
its block (the attention or the MLP) with the layers that share one input tensor (q, k and v),
for AWQ's block objective. A method with ``build_stage`` builds a stage's layers together, all
from the float stage, before any is installed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.errors import AdlError, opt
from adl_cli.quantization.gptq import Hessian
from adl_cli.quantization.linear import LAYERS, QuantizedLinear
from adl_cli.quantization.methods import GRIDS, METHODS, Method, QuantOptions

ROWS_KEPT = 2048  # rows of X sampled per layer for AWQ's search
SCOPE_TOKENS = 4096  # tokens of a block module's recorded inputs for AWQ's block objective


@dataclass
class Target:
    name: str
    parent: nn.Module
    attr: str
    linear: nn.Linear


def linear_targets(model: nn.Module, *, head: bool) -> list[Target]:
    found = []
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{pname}.{attr}" if pname else attr
            if isinstance(child, nn.Linear) and (head or name != "lm_head"):
                found.append(Target(name, parent, attr, child))
    return found


def stages(targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by block (the first numbered component of the name), in block order; the
    rest after."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        m = re.search(r"\.(\d+)\.", f".{t.name}.")
        groups.setdefault(int(m.group(1)) if m else 1 << 30, []).append(t)
    return [groups[k] for k in sorted(groups)]


def resolve_group(method: Method, opts: QuantOptions, targets: list[Target]) -> int:
    """The group size: the one asked for, else the method's default, halved (down to 32) until it
    divides every target's input width (a 192-wide model gets 64 where the default is 128)."""
    if opts.group_size is not None or not method.default_group:
        return method.group(opts)
    group = method.default_group
    while group > 32 and any(t.linear.in_features % group for t in targets):
        group //= 2
    return group


def check_options(method: Method, opts: QuantOptions, targets: list[Target]) -> None:
    """Every option the method cannot honour, as one clear error (``opts.group_size`` resolved)."""
    if opts.bits is not None and opts.bits not in method.bits_choices:
        allowed = f"one of {', '.join(map(str, method.bits_choices))}" if method.bits_choices else f"fixed at {method.default_bits}"
        raise AdlError(f"{opt('bits')} for {method.name} is {allowed}, got {opts.bits}")
    if opts.grid is not None:
        if method.grid_default is None:
            raise AdlError(f"{opt('grid')} applies to int8 and int4, not {method.name}")
        if opts.grid not in GRIDS:
            raise AdlError(f"{opt('grid')} must be one of {', '.join(GRIDS)}, got '{opts.grid}'")
    group = method.group(opts)
    if group < 0:
        raise AdlError(f"{opt('group_size')} must be 0 (a whole row) or positive, got {group}")
    if method.name in ("nf4", "fp4") and group not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise AdlError(f"{opt('group_size')} for {method.name} must be a bitsandbytes block size (32 to 4096, a power of 2), got {group}")
    if method.name in ("smoothquant", "llm-int8") and opts.group_size not in (None, 0):
        raise AdlError(f"{method.name} keeps one scale a row: {opt('group_size')} does not apply")
    for t in targets:
        width = t.linear.in_features
        if group and width % group and method.name not in ("nf4", "fp4"):  # bitsandbytes' blocks run over the flattened weight
            raise AdlError(f"{opt('group_size')} {group} does not divide the input width {width} of {t.name}")
        if method.bits(opts) == 4 and method.name in ("int4", "nf4-adl", "gptq", "awq", "hqq") and width % 2:
            raise AdlError(f"{t.name} has an odd input width ({width}): 4-bit weights are stored two a byte")
    if not 0.0 <= opts.alpha <= 1.0:
        raise AdlError(f"{opt('alpha')} must be in [0, 1], got {opts.alpha}")
    if opts.threshold <= 0:
        raise AdlError(f"{opt('threshold')} must be positive, got {opts.threshold}")
    if not 0.0 < opts.damp < 1.0:
        raise AdlError(f"{opt('damp')} must be in (0, 1), got {opts.damp}")


def plan(model: nn.Module, method_name: str, opts: QuantOptions) -> tuple[Method, list[Target], QuantOptions]:
    """(the method, the layers it will replace, the options with the group size resolved), every
    option checked: what ``quantize_model`` does first, and a command before any calibration."""
    method = METHODS.get(method_name)
    targets = linear_targets(model, head=opts.head)
    if not targets:
        raise AdlError("the model has no linear layers to quantize")
    opts = dataclasses.replace(opts, group_size=resolve_group(method, opts, targets))
    check_options(method, opts, targets)
    return method, targets, opts


class _Stop(Exception):
    """Raised by a hook once every layer of the stage has seen its input."""


@torch.no_grad()
def stage_stats(model: nn.Module, stage: list[Target], windows: torch.Tensor, needs: tuple[str, ...], *, batch_size: int = 8,
                seed: int = 0) -> dict[str, dict]:
    """Per layer of ``stage``: the statistics ``needs`` of its inputs over the calibration windows."""
    stats: dict[str, dict] = {t.name: {} for t in stage}
    hess = {t.name: Hessian(t.linear.in_features) for t in stage} if "hessian" in needs else {}
    absmax = {t.name: torch.zeros(t.linear.in_features) for t in stage}
    rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in stage}
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, ROWS_KEPT * batch_size // max(1, len(windows)))
    seen: set[str] = set()
    first_input: dict[str, torch.Tensor] = {}  # held so that equal identity means one shared tensor
    scopes = {id(t.parent): t.parent for t in stage if "scope" in needs and t.parent is not model}
    recorded: dict[int, list] = {k: [] for k in scopes}
    tokens = {k: 0 for k in scopes}

    def scope_hook(key):
        def fn(_module, args, kwargs):
            if tokens[key] < SCOPE_TOKENS:
                recorded[key].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                                      {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
                tokens[key] += args[0].shape[:-1].numel() if torch.is_tensor(args[0]) else SCOPE_TOKENS
        return fn

    def hook(name):
        def fn(_module, args, _out=None):
            first_input.setdefault(name, args[0])
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()
            if name in hess:
                hess[name].add(x)
            if "absmax" in needs:
                absmax[name] = torch.maximum(absmax[name], x.abs().amax(0))
            if "rows" in needs:
                pick = torch.randperm(x.shape[0], generator=gen)[:per_batch]
                rows[name].append(x[pick])
            seen.add(name)
            if len(seen) == len(stage):
                raise _Stop
        return fn

    handles = [t.linear.register_forward_pre_hook(hook(t.name)) for t in stage]
    handles += [m.register_forward_pre_hook(scope_hook(k), with_kwargs=True) for k, m in scopes.items()]
    try:
        for i in range(0, len(windows), batch_size):
            seen.clear()
            try:
                model(windows[i:i + batch_size].to(next(model.parameters()).device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for t in stage:  # a layer the forward never reached gets round-to-nearest's statistics
        if "hessian" in needs:
            stats[t.name]["hessian"] = hess[t.name].h if hess[t.name].n else torch.eye(t.linear.in_features, dtype=torch.float64)
        if "absmax" in needs:
            stats[t.name]["absmax"] = absmax[t.name]
        if "rows" in needs:
            stats[t.name]["rows"] = torch.cat(rows[t.name])[:ROWS_KEPT] if rows[t.name] else torch.ones(1, t.linear.in_features)
        if id(t.parent) in scopes and t.name in first_input:
            stats[t.name]["scope"] = recorded[id(t.parent)]
            stats[t.name]["shares_input_with"] = [u.name for u in stage if u.parent is t.parent and first_input.get(u.name) is first_input[t.name]]
    return stats


def quantize_model(model: nn.Module, method_name: str, opts: QuantOptions, windows: torch.Tensor | None = None,
                   progress=None) -> tuple[dict[str, dict], QuantOptions]:
    """Replace ``model``'s linear layers in place by the method's quantized layers; returns the
    layer specs (name -> spec) quantization.json records and the options as applied (the group
    size resolved). ``windows`` (n, T) token ids: the calibration text of a calibrated method (an
    AdlError when missing)."""
    method, targets, opts = plan(model, method_name, opts)
    if method.stats and (windows is None or len(windows) == 0):
        raise AdlError(f"{method.name} needs calibration text: the run's training split, or {opt('calib_data')}")
    group = method.group(opts)
    specs = {}
    was_training = model.training
    model.eval()
    order = stages(targets)
    for k, stage in enumerate(order):
        stats = stage_stats(model, stage, windows, method.stats, seed=opts.seed + k) if method.stats else {}
        if method.build_stage is not None:
            built = method.build_stage(stage, stats, opts, group)
        else:
            built = {t.name: method.build(t.linear, stats.get(t.name, {}), opts, group) for t in stage}
        for t in stage:
            layer = built[t.name].to(t.linear.weight.device)
            layer.prepare()
            setattr(t.parent, t.attr, layer)
            specs[t.name] = layer.spec()
        if progress is not None:
            progress(k + 1, len(order))
    model.train(was_training)
    return specs, opts


def install(model: nn.Module, specs: dict[str, dict]) -> None:
    """Shells of the quantized layers ``specs`` names, in place of the model's linear layers (to load a
    quantized run's weights into, then ``prepare_all``)."""
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name) if parent_name else model
        linear = getattr(parent, attr, None) if parent is not None else None
        if not isinstance(linear, nn.Linear):
            raise AdlError(f"quantization.json names layer '{name}', which the model has not (or not as a linear layer)")
        cls = LAYERS.get(spec.get("kind", "?"))
        setattr(parent, attr, cls.empty(spec, linear.in_features, linear.out_features, linear.bias is not None))


def prepare_all(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.prepare()


def bits_per_parameter(quantized: nn.Module, n_params: int, float_dtype: str = "fp32") -> float:
    """Stored bits (every tensor of the quantized run's file, shared ones once) / parameters of the
    float model."""
    from adl_cli.quantization.store import stored_tensors

    bits = sum(t.numel() * t.element_size() * 8 for t in stored_tensors(quantized, float_dtype).values())
    return bits / n_params
