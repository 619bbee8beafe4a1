"""Optimizers and learning-rate schedules by name, over parameter groups the method gives.

Parameter groups: a list of ``{"params": [...], "weight_decay": wd, "lr_scale": s}``; a group's
peak lr is ``train.lr * lr_scale`` (a method gives LoRA adapters their own rate this way). The
default groups (``param_groups``) decay matrices (dim >= 2: linear weights, embeddings) and not
biases or norm gains (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).

Schedules give the lr at step t as a fraction of the peak; every one warms up linearly first,
    f(t) = (t + 1) / warmup                                  t < warmup  (the peak at t = warmup - 1)
and then, with p = (t - t0) / (steps - 1 - t0), t0 = max(warmup - 1, 0), m = min_lr / lr:
    cosine    m + (1 - m) (1 + cos(pi p)) / 2                 (Loshchilov & Hutter, SGDR, 2017)
    linear    1 - (1 - m) p
    constant  1
    wsd       1 until the last ``decay_fraction`` of the steps, then linear to m
              (warmup-stable-decay; Hu et al., MiniCPM, 2024)
so the peak is used for exactly one step (cosine, linear) and the last step runs at min_lr.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from adl_cli.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("lr schedule")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups over the trainable parameters (each shared tensor once)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def fused_available(device: torch.device) -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cpu", "cuda", "mps", "xpu")


def _with_lr(groups: list[dict], lr: float) -> list[dict]:
    """Each group's own peak lr (``initial_lr``) from train.lr and its ``lr_scale``; schedules scale it."""
    out = []
    for g in groups:
        peak = lr * float(g.get("lr_scale", 1.0))
        out.append({**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": peak, "initial_lr": peak})
    return out


@OPTIMIZERS.register("adamw")
def make_adamw(groups: list[dict], cfg, device: torch.device, compute_dtype: torch.dtype | None = None) -> tuple[torch.optim.Optimizer, str]:
    """AdamW (fused kernel where torch has one for the device)."""
    use_fused = cfg.fused_adamw and fused_available(device)
    opt = torch.optim.AdamW(_with_lr(groups, cfg.lr), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=use_fused or None)
    return opt, f"AdamW ({'fused' if use_fused else 'foreach'})"


@OPTIMIZERS.register("sgd")
def make_sgd(groups: list[dict], cfg, device: torch.device, compute_dtype: torch.dtype | None = None) -> tuple[torch.optim.Optimizer, str]:
    """SGD with (Nesterov) momentum ``train.momentum`` and decoupled-from-nothing L2 weight decay."""
    opt = torch.optim.SGD(_with_lr(groups, cfg.lr), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return opt, f"SGD (momentum {cfg.momentum}{', Nesterov' if cfg.momentum > 0 else ''})"


@OPTIMIZERS.register("muon")
def make_muon(groups: list[dict], cfg, device: torch.device, compute_dtype: torch.dtype | None = None) -> tuple[torch.optim.Optimizer, str]:
    """Muon on the hidden layers' matrices, AdamW on the rest (see engine/muon.py)."""
    from adl_cli.engine.muon import Muon, split_for_muon

    ns_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else None  # Newton-Schulz follows the run's compute dtype
    opt = Muon(split_for_muon(_with_lr(groups, cfg.lr), cfg), betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum, ns_dtype=ns_dtype)
    return opt, f"Muon (lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum}, Newton-Schulz in {'bf16' if ns_dtype else 'fp32'}) + AdamW"


@OPTIMIZERS.register("adamw8bit")
def make_adamw8bit(groups: list[dict], cfg, device: torch.device, compute_dtype: torch.dtype | None = None) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with its two moments in 8 bits (blockwise dynamic quantization, Dettmers et al. 2022),
    through bitsandbytes: 2 bytes of state per parameter instead of 8."""
    from adl_cli.quantization.bnb import bitsandbytes

    bnb = bitsandbytes('train.optimizer = "adamw8bit"')
    opt = bnb.optim.AdamW8bit(_with_lr(groups, cfg.lr), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return opt, "AdamW 8-bit (bitsandbytes)"


def make_optimizer(name: str, groups: list[dict], cfg, device: torch.device, compute_dtype: torch.dtype | None = None) -> tuple[torch.optim.Optimizer, str]:
    """An optimizer from the registry: ``factory(groups, cfg, device, compute_dtype) -> (optimizer, description)``."""
    return OPTIMIZERS.get(name)(groups, cfg, device, compute_dtype)


def _warm(step: int, warmup: int) -> float | None:
    return (step + 1) / warmup if warmup > 0 and step < warmup else None


def _progress(step: int, warmup: int, steps: int) -> float:
    peak = max(warmup - 1, 0)
    if steps - 1 <= peak:
        return 0.0
    return min(1.0, (step - peak) / (steps - 1 - peak))


@SCHEDULES.register("cosine")
def cosine(step: int, *, steps: int, warmup: int, floor: float, decay_fraction: float = 0.2) -> float:
    w = _warm(step, warmup)
    return w if w is not None else floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, steps)))


@SCHEDULES.register("linear")
def linear(step: int, *, steps: int, warmup: int, floor: float, decay_fraction: float = 0.2) -> float:
    w = _warm(step, warmup)
    return w if w is not None else 1.0 - (1.0 - floor) * _progress(step, warmup, steps)


@SCHEDULES.register("constant")
def constant(step: int, *, steps: int, warmup: int, floor: float, decay_fraction: float = 0.2) -> float:
    w = _warm(step, warmup)
    return w if w is not None else 1.0


@SCHEDULES.register("wsd")
def warmup_stable_decay(step: int, *, steps: int, warmup: int, floor: float, decay_fraction: float = 0.2) -> float:
    w = _warm(step, warmup)
    if w is not None:
        return w
    decay = max(1, round(decay_fraction * steps))
    start = steps - decay  # the first step below the peak
    if step < start:
        return 1.0
    return 1.0 - (1.0 - floor) * min(1.0, (step - start + 1) / decay)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int, schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """The peak-group lr at ``step`` (train.lr scaled by the schedule)."""
    fn: Callable = SCHEDULES.get(schedule)
    return lr * fn(step, steps=steps, warmup=warmup, floor=min_lr / lr, decay_fraction=decay_fraction)
