"""The pieces of RL from feedback on sequences: advantages, the clipped surrogate and its token
weighting, value loss, KL penalties (the RL issue's `adl rlhf ppo` and `adl rlhf grpo` build on them).

Shapes: a batch of B completions as (B, T) tensors right-padded with ``mask`` (1 on completion
tokens, 0 after), log-probabilities of the sampled tokens per position.

GAE (Schulman et al. 2016): with per-token rewards r_t and values V_t,
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lambda)^l delta_{t+l},   returns = A + V;
with gamma = lambda = 1 the advantage is the return-to-go minus the value.

Group-relative advantages (GRPO, Shao et al. 2024): n samples per prompt with rewards r_i,
    A_i = (r_i - mean(r)) / (std(r) + eps)      (``scale = True``; Dr. GRPO, Liu et al. 2025, drops the
                                                 division: ``scale = False``)
RLOO (Ahmadian et al. 2024): the baseline of sample i is the mean of the other n - 1 rewards,
    A_i = r_i - (sum_j r_j - r_i) / (n - 1).
A group whose rewards are all equal gives 0 everywhere (never NaN).

Clipped surrogate (PPO, Schulman et al. 2017; DAPO's decoupled bounds, Yu et al. 2025), per token
with ratio rho = exp(log pi - log pi_old):
    l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
and the batch loss is a weighted sum of l_t, by ``loss_type``:
    grpo:    (1 / B) sum_i (1 / |o_i|) sum_t l_it        (each completion's mean, then the mean)
    dapo:    sum_it l_it / sum_i |o_i|                    (every token of the batch weighs the same)
    dr_grpo: sum_it l_it / (B * T_max)                    (a constant: no length bias at all)
KL estimators of KL(pi || pi_ref) from sampled tokens (Schulman 2020, "Approximating KL"):
    k1 = log pi - log pi_ref (InstructGPT's per-token penalty),  k3 = exp(-k1) + k1 - 1 >= 0.
The adaptive KL coefficient (Ziegler et al. 2019) moves beta to keep the measured KL near a target.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T): generalised advantage estimation over each row's
    completion tokens (``mask``); the value after a row's last token is 0."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    m = mask.float()
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t].float() + gamma * next_value - values[:, t].float()
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
        next_value = values[:, t].float() * m[:, t]
    return adv, (adv + values.float()) * m


def group_advantages(rewards: torch.Tensor, group: int, *, scale: bool = True, rloo: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Advantages (N,) of rewards (N,) laid out as N / ``group`` consecutive groups of one prompt's
    samples: reward minus the group mean (``rloo``: minus the mean of the others), divided by the
    group's standard deviation when ``scale``. A group of equal rewards gives zeros."""
    if rewards.ndim != 1 or rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group}")
    if rloo and group < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.float().view(-1, group)
    if rloo:
        adv = r - (r.sum(1, keepdim=True) - r) / (group - 1)
    else:
        adv = r - r.mean(1, keepdim=True)
    if scale:
        std = r.std(1, keepdim=True, unbiased=True) if group > 1 else torch.zeros_like(r[:, :1])
        adv = torch.where(std > eps, adv / (std + eps), torch.zeros_like(adv))
    return adv.reshape(-1)


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, eps_low: float = 0.2,
                       eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), whether the clip was
    active), each (B, T); ``advantages`` (B, T) or (B,) (one per completion)."""
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logps.float() - old_logps.float())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def token_weights(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The weight (B, T) of each token's loss in the batch loss for ``loss_type`` (module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    m = mask.float()
    B, T = m.shape
    if loss_type == "grpo":
        return m / (m.sum(1, keepdim=True).clamp_min(1.0) * B)
    if loss_type == "dapo":
        return m / m.sum().clamp_min(1.0)
    return m / (B * T)


def policy_loss(logps, old_logps, advantages, mask, *, loss_type: str = "grpo", eps_low: float = 0.2,
                eps_high: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's clipped surrogate loss, weighted by ``loss_type``, and the share of completion
    tokens whose ratio was clipped."""
    per_token, clipped = clipped_token_loss(logps, old_logps, advantages, eps_low=eps_low, eps_high=eps_high)
    loss = (per_token * token_weights(mask, loss_type)).sum()
    m = mask.float()
    return loss, {"clip_fraction": (clipped.float() * m).sum() / m.sum().clamp_min(1.0)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), the
    mean over completion tokens."""
    v = values.float()
    clipped = old_values.float() + torch.clamp(v - old_values.float(), -clip, clip)
    err = torch.maximum((v - returns) ** 2, (clipped - returns) ** 2)
    m = mask.float()
    return 0.5 * (err * m).sum() / m.sum().clamp_min(1.0)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token log pi - log pi_ref of sampled tokens (unbiased for KL, can be negative)."""
    return logps.float() - ref_logps.float()


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1: unbiased for KL(pi || pi_ref)
    on samples of pi, never negative, 0 where the two agree."""
    d = ref_logps.float() - logps.float()
    return torch.exp(d) - d - 1.0


class AdaptiveKL:
    """Ziegler et al. (2019): after each batch, beta *= 1 + clip((KL / target - 1), -0.2, 0.2) * n / horizon."""

    def __init__(self, beta: float, target: float, horizon: int = 10000):
        if beta < 0 or target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKL needs beta >= 0, target > 0 and horizon > 0")
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.beta *= 1.0 + error * n / self.horizon
        return self.beta
