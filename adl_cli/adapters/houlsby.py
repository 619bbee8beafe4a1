"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after each block's attention
and after its MLP, the rest of the model frozen.

    h <- h + W_up f(W_down h + b_down) + b_up      W_down: m x d, W_up: d x m, f = GELU

Each adapter holds 2md + m + d parameters (m the bottleneck width, d the model's); its weights
start small (normal, std ``init_std``) and its biases at zero, so the model starts near its base,
as the paper asks. peft has no such adapter, so this one is adl's own. The adapters sit in
``model.bottlenecks`` and are applied by forward hooks on each block's ``attn`` and ``mlp``:
the base weights keep their names, so an adapter run stores only the adapters' tensors. They
cannot be folded into the base weights (the bottleneck is non-linear).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.runs import ADAPTERS


@dataclass
class BottleneckSection:
    """The recipe's ``[adapter]``: bottleneck width, where, and the initial weight scale."""

    size: int = 32  # m, the bottleneck width
    places: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # after attention and/or after the MLP
    init_std: float = 1e-3
    train_norms: bool = True  # the layer norms learn too, as in the paper

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"adapter.size (the bottleneck width) must be >= 1, got {self.size}")
        bad = [p for p in self.places if p not in ("attn", "mlp")]
        if bad or not self.places:
            raise ValueError(f"adapter.places must list attn and/or mlp, got {list(self.places)}")
        if self.init_std < 0:
            raise ValueError(f"adapter.init_std must be >= 0, got {self.init_std}")

    def to_dict(self) -> dict:
        return {"size": self.size, "places": list(self.places), "init_std": self.init_std, "train_norms": self.train_norms}


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int, init_std: float):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


def _hook(adapter: Bottleneck):
    def apply(module, args, output):
        return adapter(output)

    return apply


def add_bottlenecks(model: nn.Module, section: BottleneckSection) -> nn.Module:
    """``model`` with a bottleneck after each block's chosen sub-layers; only they (and, with
    train_norms, the norms) require grad."""
    try:
        section.validate()
    except ValueError as e:
        raise AdlError(str(e)) from None
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise AdlError("bottleneck adapters need a model with transformer blocks (model.transformer.h)")
    d = model.config.n_embd
    adapters = nn.ModuleDict()
    for i, block in enumerate(blocks):
        for place in section.places:
            adapter = Bottleneck(d, section.size, section.init_std).to(next(block.parameters()))
            adapters[f"h{i}_{place}"] = adapter
            getattr(block, place).register_forward_hook(_hook(adapter))
    model.bottlenecks = adapters
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("bottlenecks.") or (section.train_norms and _is_norm(name)) or "trainable_tokens_delta" in name)
    return model


def _is_norm(name: str) -> bool:
    return any(part.startswith("ln_") for part in name.split("."))


def adapter_tensors(model: nn.Module, section: BottleneckSection) -> dict[str, torch.Tensor]:
    """The adapters' tensors (and the norms', when they learn)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters()
            if n.startswith("bottlenecks.") or (section.train_norms and _is_norm(n))}


def _apply(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    section = BottleneckSection(**{k: v for k, v in config.items() if k in BottleneckSection.__dataclass_fields__})
    from adl_cli.adapters.tokens import DELTA

    model = add_bottlenecks(model, section)
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if DELTA not in k}, strict=False)
    absent = [k for k in model.state_dict() if k.startswith("bottlenecks.") and k not in tensors]
    if unexpected or absent:
        raise AdlError(f"the adapter's tensors do not fit this model: {', '.join((list(unexpected) + absent)[:3])}")
    return model


ADAPTERS.register("adapter")(_apply)
