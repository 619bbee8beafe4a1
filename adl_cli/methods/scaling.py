"""Scaling-law fits (Hoffmann et al., "Training Compute-Optimal Large Language Models", 2022).

Approach 3: the final loss of a model of N parameters trained on D tokens is modelled as

    L(N, D) = E + A / N^alpha + B / D^beta

and fitted, as the authors do, by minimising the Huber loss (delta = 1e-3) between the log of the
prediction, written as a log-sum-exp, and the log of the observed loss,

    min over (a, b, e, alpha, beta) of  sum_i Huber( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

with A = exp(a), B = exp(b), E = exp(e), by L-BFGS from a grid of initialisations (the best fit
kept). Under a compute budget C = 6 N D the loss-optimal split is

    N_opt = G (C / 6)^(beta / (alpha + beta)),  D_opt = (C / 6) / N_opt,  G = (alpha A / (beta B))^(1 / (alpha + beta)).

This module holds the fit; the sweep that produces (N, D, L) and the `adl scaling` command are
still to come (the "how to train transformers" issue).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) that minimise the fitted loss at C = 6 N D."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (flops / 6.0) ** (self.beta / (self.alpha + self.beta))
        return n, flops / 6.0 / n


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def fit_loss_law(n, d, loss, *, delta: float = 1e-3, grid: dict | None = None, iterations: int = 200) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (n[i], d[i], loss[i]); Chinchilla's approach 3."""
    n_t = torch.as_tensor(n, dtype=torch.float64)
    d_t = torch.as_tensor(d, dtype=torch.float64)
    log_l = torch.as_tensor(loss, dtype=torch.float64).log()
    if not (len(n_t) == len(d_t) == len(log_l)) or len(n_t) < 5:
        raise ValueError("a scaling fit needs at least 5 runs, each with N, D and a loss")
    log_n, log_d = n_t.log(), d_t.log()
    grid = grid or {"a": [0.0, 5.0, 10.0, 15.0], "b": [0.0, 5.0, 10.0, 15.0], "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
                    "alpha": [0.0, 0.5, 1.0], "beta": [0.0, 0.5, 1.0]}
    best = None
    for a0, b0, e0, al0, be0 in itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]):
        p = torch.tensor([a0, b0, e0, al0, be0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([p], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

        def value_of(q):
            a, b, e, al, be = q
            pred = torch.logsumexp(torch.stack([a - al * log_n, b - be * log_d, e.expand_as(log_n)]), dim=0)
            return _huber(pred - log_l, delta).sum()

        def objective():
            opt.zero_grad()
            value = value_of(p)
            value.backward()
            return value

        try:
            opt.step(objective)
        except RuntimeError:
            continue
        with torch.no_grad():
            value = float(value_of(p))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, p.detach().clone())
    if best is None:
        raise ValueError("the scaling fit did not converge from any initialisation")
    a, b, e, al, be = best[1].tolist()
    return ScalingFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, objective=best[0])
