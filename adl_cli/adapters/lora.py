"""LoRA and DoRA on adl models, through peft.

LoRA (Hu et al., 2021) adds to a frozen linear W a low-rank update: y = W x + (alpha / r) B A x,
A (r x in) random, B (out x r) zero, so the model starts equal to its base. rsLoRA (Kalajdzievski,
2023) scales by alpha / sqrt(r) instead. DoRA (Liu et al., 2024) splits the updated weight into a
magnitude vector and a direction: W' = m (W + s B A) / ||W + s B A||_c, m starting at ||W||_c.

adl does not re-implement these: peft injects its layers into adl's modules by name (``q_proj``,
``k_proj``, ``v_proj``, ``c_proj``, ``c_fc``: adl's GPT keeps q, k and v separate so they can be
targeted one by one), freezes everything else, and reads and writes the adapter tensors in its
own format. This module checks the recipe's choices against the model, names what it cannot
find, and folds adapters into plain weights (``merge``). The adapter kinds ``lora`` and ``dora``
are registered with the run folder (``runs.ADAPTERS``): an adapter run loads its base, then this.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.runs import ADAPTERS


@dataclass
class LoraSection:
    """The recipe's ``[lora]``: rank, scaling, dropout and the linear layers it adapts (a name
    matches a module whose own name or dotted path ends with it, e.g. ``q_proj`` or ``mlp.c_proj``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed: a trained magnitude per output channel
    modules_to_save: list[str] = field(default_factory=list)  # layers trained in full beside the adapters (peft's modules_to_save), e.g. wte, ln_1, ln_2, ln_f

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r (the rank) must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one linear layer (e.g. [\"q_proj\", \"v_proj\"])")

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "rslora": self.rslora, "dora": self.dora, "modules_to_save": list(self.modules_to_save)}


def linear_names(model: nn.Module) -> list[str]:
    """Dotted paths of the model's linear layers (what LoRA can adapt)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The linear layers each target names; a target matching none is an error naming it and
    listing the layer names there are."""
    names = linear_names(model)
    out = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            kinds = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names if "." in n})
            raise AdlError(f"lora.targets: no linear layer named {t!r} in this model; choose among {', '.join(kinds)}")
        out += hits
    return sorted(set(out))


def peft_config(section: LoraSection, model: nn.Module):
    try:
        from peft import LoraConfig
    except ImportError:
        raise AdlError("LoRA needs peft: pip install peft") from None
    modules = resolve_targets(model, section.targets)
    # peft matches a full name exactly when given a regular expression: the resolved paths, nothing else
    pattern = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    for m in section.modules_to_save:
        if m not in names:
            raise AdlError(f"lora.modules_to_save: no layer named {m!r} in this model (e.g. wte, ln_1, ln_2, ln_f)")
    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=pattern,
                      use_rslora=section.rslora, use_dora=section.dora, bias="none", modules_to_save=list(section.modules_to_save) or None)


def add_lora(model: nn.Module, section: LoraSection) -> nn.Module:
    """``model`` with LoRA (or DoRA) layers injected in place; only their tensors require grad."""
    from peft import inject_adapter_in_model

    try:
        section.validate()
    except ValueError as e:
        raise AdlError(str(e)) from None
    cfg = peft_config(section, model)
    with warnings.catch_warnings():  # new token rows (adapters/tokens.py) are peft's too: two configs in one model is intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            p.requires_grad_(True)
        elif "trainable_tokens_delta" not in name:  # new token rows (adapters/tokens.py) keep training
            p.requires_grad_(False)
    _retie(model)
    return model


def _saved_copy(module: nn.Module) -> nn.Module | None:
    """The trained copy peft keeps of a module in ``modules_to_save`` (None for other modules)."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return None
    return copies[module.active_adapters[0]]


def _retie(model: nn.Module) -> None:
    """A tied head reads the embedding table the model trains: peft's copy when ``wte`` is in
    ``modules_to_save`` (peft ties only transformers' models), else wte itself."""
    if not getattr(getattr(model, "config", None), "tie_embeddings", False):
        return
    wte = model.transformer.wte
    table = _saved_copy(wte)
    if table is None and isinstance(wte, nn.Embedding):
        table = wte  # after a merge: the plain table again
    if table is not None and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = table.weight


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, named as peft names them in its saved files (module path, then
    ``lora_A.weight`` / ``lora_B.weight`` / ``lora_magnitude_vector``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise AdlError(f"the adapter holds tensors this model has no place for: {', '.join(unexpected[:3])}")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back: an ordinary model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        copy = _saved_copy(module)
        if isinstance(module, BaseTunerLayer) or copy is not None:
            if copy is None:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, copy if copy is not None else module.get_base_layer())
    _retie(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block ``model`` computes as its base: every peft layer (LoRA, DoRA, trainable
    token rows) passes its input through the frozen original. The reference of a LoRA policy in
    DPO and PPO, without a second copy of the model. Which tensors train is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no adapter layers to turn off")
    was = [m.disable_adapters for m in layers]
    grads = {p: p.requires_grad for p in model.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, off in zip(layers, was):
            m.enable_adapters(not off)
        for p, g in grads.items():
            p.requires_grad_(g)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def _apply(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An adapter run's kind: inject the recorded configuration, then its tensors."""
    from adl_cli.adapters.tokens import DELTA

    section = LoraSection(**{k: v for k, v in config.items() if k in LoraSection.__dataclass_fields__})
    if config.get("qlora") is not None:  # the base in NF4 again, as it trained
        from adl_cli.adapters.qlora import QloraSection, quantize

        model = quantize(model, QloraSection(**config["qlora"]))
    model = add_lora(model, section)
    load_adapter(model, {k: v for k, v in tensors.items() if DELTA not in k})
    return model


ADAPTERS.register("lora")(_apply)
