"""Scaling-law fits (Hoffmann et al., "Training Compute-Optimal Large Language Models", 2022).

Approach 3: the final loss of a model of N parameters trained on D tokens is modelled as

    L(N, D) = E + A / N^alpha + B / D^beta

and fitted, as the authors do, by minimising the Huber loss (delta = 1e-3) between the log of the
prediction, written as a log-sum-exp, and the log of the observed loss,

    min over (a, b, e, alpha, beta) of  sum_i Huber( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

with A = exp(a), B = exp(b), E = exp(e), by L-BFGS from a grid of initialisations (the best fit
kept). Under a compute budget C = 6 N D the loss-optimal split is

    N_opt = G (C / 6)^(beta / (alpha + beta)),  D_opt = (C / 6) / N_opt,  G = (alpha A / (beta B))^(1 / (alpha + beta)).

Approach 2 (IsoFLOP profiles): at each compute budget, runs of several sizes; a parabola in log N
through their losses gives the loss-optimal N_opt(C); then N_opt = k C^a and D_opt = C / (6 N_opt)
are fitted in log space (least squares). Approach 3 predicts a = beta / (alpha + beta).

Uncertainty comes from the bootstrap: runs are resampled with replacement and refitted; the
interval of each constant is the 2.5th to 97.5th percentile of its refits. The sweep that produces
the runs is ``adl_cli.methods.scaling_sweep``.
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

    @property
    def n_exponent(self) -> float:
        """a in N_opt proportional to C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    def start(self) -> tuple[float, float, float, float, float]:
        """This fit as a starting point of ``fit_loss_law`` (log A, log B, log E, alpha, beta)."""
        return (math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta)


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


DEFAULT_GRID = {"a": [0.0, 5.0, 10.0, 15.0], "b": [0.0, 5.0, 10.0, 15.0], "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
                "alpha": [0.0, 0.5, 1.0], "beta": [0.0, 0.5, 1.0]}


def _objective(p: torch.Tensor, log_n, log_d, log_l, delta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The Huber objective of each row of ``p`` (S, 5: log A, log B, log E, alpha, beta), each run
    counted ``weights[s, i]`` times (bootstrap resamples) or once."""
    a, b, e, al, be = (t[:, None] for t in p.unbind(-1))
    pred = torch.logsumexp(torch.stack([a - al * log_n, b - be * log_d, e.expand(-1, log_n.shape[0])]), dim=0)
    h = _huber(pred - log_l, delta)
    return (h * weights).sum(-1) if weights is not None else h.sum(-1)


def _descend(p0: torch.Tensor, value_of, steps: int) -> torch.Tensor:
    """Adam on every start at once (the objectives are independent, so each row follows its own
    path), the step size decaying on a cosine: the coarse pass before L-BFGS."""
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        value_of(p).nan_to_num(0.0, 0.0, 0.0).sum().backward()
        opt.step()
        sched.step()
    return p.detach()


def _polish(p0: torch.Tensor, value_of, iterations: int) -> tuple[float, torch.Tensor]:
    p = p0.clone()[None].requires_grad_(True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-14, tolerance_change=1e-16)

    def objective():
        opt.zero_grad()
        value = value_of(p).sum()
        value.backward()
        return value

    try:
        opt.step(objective)
    except RuntimeError:
        return math.inf, p0
    with torch.no_grad():
        return float(value_of(p).sum()), p.detach()[0]


def _data(n, d, loss):
    n_t, d_t, l_t = (torch.as_tensor(v, dtype=torch.float64) for v in (n, d, loss))
    if not (len(n_t) == len(d_t) == len(l_t)) or len(n_t) < 5:
        raise ValueError("a scaling fit needs at least 5 runs, each with N, D and a loss")
    return n_t.log(), d_t.log(), l_t.log()


def fit_loss_law(n, d, loss, *, delta: float = 1e-3, grid: dict | None = None, starts: list | None = None,
                 coarse_steps: int = 100, polish: int = 8, iterations: int = 200) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (n[i], d[i], loss[i]); Chinchilla's approach 3.
    Every point of ``grid`` (values of log A, log B, log E, alpha, beta), or the given ``starts``
    (such tuples), descends at once (batched Adam); the ``polish`` best then run L-BFGS to
    convergence, and the lowest objective wins. (The authors run L-BFGS from every grid point;
    the batched pass finds the same basins in a second instead of half a minute.)"""
    log_n, log_d, log_l = _data(n, d, loss)
    grid = grid or DEFAULT_GRID
    points = starts if starts is not None else list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]))
    p0 = torch.tensor([list(map(float, q)) for q in points], dtype=torch.float64)

    def value_of(p):
        return _objective(p, log_n, log_d, log_l, delta)

    coarse = _descend(p0, value_of, coarse_steps) if coarse_steps else p0
    with torch.no_grad():
        values = value_of(coarse)
    best = None
    for i in torch.argsort(values.nan_to_num(math.inf))[:polish].tolist():
        value, p = _polish(coarse[i], value_of, iterations)
        if not math.isfinite(value) and math.isfinite(float(values[i])):
            value, p = float(values[i]), coarse[i]
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, p)
    if best is None:
        raise ValueError("the scaling fit did not converge from any initialisation")
    a, b, e, al, be = best[1].tolist()
    return ScalingFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, objective=best[0])


@dataclass
class IsoFlopMinimum:
    flops: float  # the budget C
    n_opt: float  # the parabola's minimum in log N
    d_opt: float  # C / (6 N_opt)
    loss: float  # the parabola's value there
    inside: bool  # the minimum lies within the sizes run at this budget (else an extrapolation)
    runs: int
    coef: tuple[float, float, float]  # loss = c2 (log N)^2 + c1 log N + c0
    n_range: tuple[float, float]  # the smallest and largest N run at this budget

    def curve(self, points: int = 40, clip: bool = False) -> list[tuple[float, float]]:
        """The parabola over the sizes run (and out to its minimum unless ``clip``), as (N, loss) points."""
        lo, hi = math.log(self.n_range[0]), math.log(self.n_range[1])
        if not clip:
            lo, hi = min(lo, math.log(self.n_opt)), max(hi, math.log(self.n_opt))
        c2, c1, c0 = self.coef
        xs = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        return [(math.exp(x), c2 * x * x + c1 * x + c0) for x in xs]


def isoflop_minima(flops, n, loss) -> list[IsoFlopMinimum]:
    """Approach 2's first step: per budget (runs sharing a value of ``flops`` to 1%: pass the
    budget each run was planned for), a parabola of the loss in log N and its minimum. Budgets
    with fewer than 3 sizes, or whose parabola opens downwards (no minimum), give none."""
    import numpy as np

    c, n_, l_ = (np.asarray(v, dtype=np.float64) for v in (flops, n, loss))
    groups: list[list[int]] = []
    for i in np.argsort(c):
        if groups and abs(c[i] / c[groups[-1][0]] - 1) < 0.01:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    out = []
    for g in groups:
        x, y = np.log(n_[g]), l_[g]
        if len(set(x.round(6))) < 3:
            continue
        a2, a1, a0 = np.polyfit(x, y, 2)
        if a2 <= 0:
            continue
        x_opt = -a1 / (2 * a2)
        budget = float(c[g[0]])  # runs of one budget share its value (to 1%)
        n_opt = float(np.exp(x_opt))
        out.append(IsoFlopMinimum(budget, n_opt, budget / 6.0 / n_opt, float(a0 + a1 * x_opt + a2 * x_opt**2),
                                  bool(x.min() <= x_opt <= x.max()), len(g), (float(a2), float(a1), float(a0)),
                                  (float(np.exp(x.min())), float(np.exp(x.max())))))
    return out


def power_law(x, y) -> tuple[float, float]:
    """(k, a) of y = k x^a by least squares in log space."""
    import numpy as np

    a, log_k = np.polyfit(np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64)), 1)
    return float(np.exp(log_k)), float(a)


@dataclass
class Interval:
    low: float
    high: float


def bootstrap(n, d, loss, fit: ScalingFit, *, samples: int = 200, seed: int = 0, delta: float = 1e-3,
              coarse_steps: int = 100, iterations: int = 200) -> dict[str, Interval]:
    """95% intervals (2.5th and 97.5th percentiles) of E, A, B, alpha, beta and the exponent
    a = beta/(alpha+beta) over fits to runs resampled with replacement. A resample is a count per
    run (a weight in the objective); every resample starts from the full fit and four
    perturbations of it, all descending at once, and its best start is polished with L-BFGS."""
    import numpy as np

    log_n, log_d, log_l = _data(n, d, loss)
    rng = np.random.default_rng(seed)
    base = fit.start()
    starts = [base] + [tuple(v + dv for v, dv in zip(base, jitter)) for jitter in
                       [(1, 0, 0, 0.1, 0), (0, 1, 0, 0, 0.1), (-1, -1, 0, -0.1, -0.1), (0, 0, -0.3, 0, 0)]]
    runs = len(log_n)
    counts = [np.bincount(rng.integers(0, runs, runs), minlength=runs) for _ in range(samples)]
    counts = [c for c in counts if (c > 0).sum() >= 5]  # a resample of fewer than 5 distinct runs cannot pin 5 constants
    if not counts:
        raise ValueError("no bootstrap resample holds 5 distinct runs")
    weights = torch.tensor(np.repeat(np.stack(counts), len(starts), axis=0), dtype=torch.float64)
    p0 = torch.tensor(starts * len(counts), dtype=torch.float64)
    coarse = _descend(p0, lambda p: _objective(p, log_n, log_d, log_l, delta, weights), coarse_steps)
    with torch.no_grad():
        values = _objective(coarse, log_n, log_d, log_l, delta, weights).nan_to_num(math.inf).view(len(counts), len(starts))
    draws: dict[str, list[float]] = {k: [] for k in ("E", "A", "B", "alpha", "beta", "n_exponent")}
    for i, j in enumerate(values.argmin(dim=1).tolist()):
        row = i * len(starts) + j
        w = weights[row:row + 1]
        value, p = _polish(coarse[row], lambda q: _objective(q, log_n, log_d, log_l, delta, w), iterations)
        if not math.isfinite(value):
            continue
        a, b, e, al, be = p.tolist()
        f = ScalingFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, objective=value)
        for k in ("E", "A", "B", "alpha", "beta"):
            draws[k].append(getattr(f, k))
        draws["n_exponent"].append(f.n_exponent)
    if not draws["E"]:
        raise ValueError("no bootstrap refit converged")
    return {k: Interval(float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


@dataclass
class HoldoutCheck:
    fit: ScalingFit
    flops_cut: float  # runs above this compute were left out of the fit
    errors: list[tuple[float, float, float]]  # (C, observed loss, predicted loss) of each left-out run

    @property
    def worst(self) -> float:
        """The largest relative error |predicted / observed - 1| over the left-out runs."""
        return max(abs(p / o - 1) for _, o, p in self.errors)


def holdout_check(n, d, loss, *, fraction: float = 0.1, budget=None, **fit_kwargs) -> HoldoutCheck:
    """Fit on every run below the top ``fraction`` of compute and predict the others' losses:
    whether the law extrapolates in compute. The left-out runs are those at or above the
    (1 - fraction) quantile of compute (6 N D, or the ``budget`` each run was planned for, so the
    runs of one IsoFLOP budget leave together); at least one run is left out."""
    import numpy as np

    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    c = 6 * n * d
    key = c if budget is None else np.asarray(budget, dtype=np.float64)
    cut = np.quantile(key, 1.0 - fraction, method="higher")
    out_mask = key >= cut * (1 - 1e-9)
    if out_mask.all():
        raise ValueError("the hold-out would leave out every run: give runs of more than one compute budget")
    keep, out = np.flatnonzero(~out_mask), np.flatnonzero(out_mask)
    fit = fit_loss_law(n[keep], d[keep], loss[keep], **fit_kwargs)
    errors = [(float(c[i]), float(loss[i]), fit.loss(float(n[i]), float(d[i]))) for i in out]
    return HoldoutCheck(fit, float(c[keep].max()), errors)
