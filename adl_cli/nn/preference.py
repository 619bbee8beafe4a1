"""Losses that learn from preference pairs: a prompt x, a chosen answer y_w and a rejected y_l.

Bradley-Terry reward model (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022): a scalar
reward r(x, y), trained so that p(y_w > y_l) = sigma(r(x, y_w) - r(x, y_l)):

    L_BT = -log sigma(r_w - r_l - m)

with an optional margin m (Llama 2's margin loss, Touvron et al. 2023). Only the difference of
rewards enters, so adding a constant to every reward leaves the loss unchanged.

Direct preference optimisation (Rafailov et al. 2023) trains the policy pi itself against a frozen
reference pi_ref. With the log-ratios of the summed answer log-probabilities
rho_w = log pi(y_w|x) - log pi_ref(y_w|x) and rho_l likewise, h = rho_w - rho_l, and

    DPO:               L = -log sigma(beta h)
    conservative DPO:  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
                       (labels flipped with probability eps; Mitchell 2023, "cDPO")
    IPO:               L = (h - 1 / (2 beta))^2
                       (Azar et al. 2024: regress the log-ratio gap onto a fixed target instead of
                       pushing it to infinity; h from summed log-probabilities, as in the paper)

At pi = pi_ref every rho is 0: DPO's loss is log 2 and IPO's is 1 / (4 beta^2). The implicit
rewards beta rho_w and beta rho_l are what DPO's policy believes r(x, y) to be (up to a function of
x): their difference is the margin, and the share of pairs with beta rho_w > beta rho_l is the
preference accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("dpo", "ipo")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (a bf16 log-prob sum loses the small differences these losses read)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean -log sigma(r_w - r_l - margin), metrics: accuracy (r_w > r_l), mean margin r_w - r_l)."""
    diff = _wide(chosen) - _wide(rejected)
    loss = -F.logsigmoid(diff - margin).mean()
    d = diff.detach()
    return loss, {"accuracy": (d > 0).float().mean(), "margin": d.mean(), "reward_chosen": _wide(chosen).detach().mean(),
                  "reward_rejected": _wide(rejected).detach().mean()}


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
                    beta: float, kind: str = "dpo", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO / conservative-DPO / IPO loss of a batch of pairs from summed answer
    log-probabilities (B,) of the policy and the reference, and per-batch metrics: the implicit
    rewards of chosen and rejected answers, their margin, the preference accuracy and the mean
    log-ratio log pi - log pi_ref over both answers (the data's side of the divergence)."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rho_w = _wide(policy_chosen) - _wide(ref_chosen)
    rho_l = _wide(policy_rejected) - _wide(ref_rejected)
    h = rho_w - rho_l
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    rw, rl = beta * rho_w.detach(), beta * rho_l.detach()
    metrics = {"reward_chosen": rw.mean(), "reward_rejected": rl.mean(), "margin": (rw - rl).mean(),
               "accuracy": (rw > rl).float().mean(), "mean_logratio": 0.5 * (rho_w.detach() + rho_l.detach()).mean()}
    return losses.mean(), metrics


def loss_at_reference(kind: str, beta: float) -> float:
    """The loss when the policy is the reference (every log-ratio 0): log 2 for DPO and cDPO,
    1 / (4 beta^2) for IPO."""
    return 1.0 / (4.0 * beta * beta) if kind == "ipo" else math.log(2.0)
