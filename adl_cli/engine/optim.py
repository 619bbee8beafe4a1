"""Optimizer and schedule: AdamW with decay/no-decay groups, warmup + cosine to min_lr.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019). Weight decay applies
to matrices (dim >= 2: linear weights, embeddings), not to biases and norm gains.

    lr(t) = lr * (t+1)/warmup                                  t < warmup (the peak at t = warmup - 1)
    lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2     p = (t - t0)/(steps - 1 - t0), t0 = max(warmup - 1, 0)

so the peak lr is used for exactly one step and the last step (t = steps - 1) runs at min_lr.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_available(device: torch.device) -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cpu", "cuda", "mps", "xpu")


def make_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8, fused: bool = True) -> tuple[torch.optim.AdamW, str]:
    """AdamW over decay/no-decay groups; fused when torch has it for the device. Returns (opt, kind)."""
    device = next(model.parameters()).device
    use_fused = fused and fused_available(device)
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=use_fused or None)
    return opt, "fused" if use_fused else "foreach"


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    peak = max(warmup - 1, 0)
    if steps - 1 <= peak:
        return lr
    progress = min(1.0, (step - peak) / (steps - 1 - peak))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
