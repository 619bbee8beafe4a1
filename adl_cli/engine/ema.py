"""An exponential moving average of the weights (Polyak & Juditsky 1992; as in timm's ModelEmaV2).

    theta_ema <- d theta_ema + (1 - d) theta        after every optimizer step

with the decay warmed up as d_t = min(d, (1 + t) / (10 + t)) so that early, random weights fade
quickly. The average is kept in fp32 beside the model, evaluated by swapping it in (no second
model in memory), checkpointed beside the raw weights and saved as ``model.ema.safetensors``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.rate()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the averaged weights inside the block, its own weights again after."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average under the model's parameter names (tied tensors once), on the CPU."""
        out, seen = {}, set()
        for name, p, s in zip(self.names, self.params, self.shadow):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[name.replace("_orig_mod.", "")] = s.to(p.dtype).contiguous().cpu()
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": s.contiguous().cpu() for n, s in zip(self.names, self.shadow)} | {"ema.__updates__": torch.tensor(self.updates)}

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        from adl_cli.errors import AdlError

        missing = [n for n in self.names if f"ema.{n}" not in tensors]
        if missing:
            raise AdlError(f"{where} holds no moving average of {missing[0]}: was it trained with train.ema?")
        for n, s in zip(self.names, self.shadow):
            s.copy_(tensors[f"ema.{n}"])
        self.updates = int(tensors.get("ema.__updates__", torch.tensor(0)))
