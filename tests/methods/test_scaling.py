"""Chinchilla's approach 3 recovers known constants from synthetic runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adl_cli.methods.scaling import fit_loss_law


def test_the_fit_recovers_the_constants_of_synthetic_runs():
    true = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fitted values
    rng = np.random.default_rng(0)
    ns = np.geomspace(1e6, 3e8, 8)
    ds = np.geomspace(1e8, 3e10, 8)
    n, d = map(np.array, zip(*itertools.product(ns, ds)))
    loss = true["E"] + true["A"] / n ** true["alpha"] + true["B"] / d ** true["beta"]
    loss = loss * np.exp(rng.normal(0, 0.0005, size=loss.shape))  # 0.05% noise on every run
    grid = {"a": [4.0, 6.0], "b": [4.0, 6.0], "e": [0.0, 0.5], "alpha": [0.2, 0.5], "beta": [0.2, 0.5]}
    fit = fit_loss_law(n, d, loss, grid=grid)
    for key, want in true.items():
        assert getattr(fit, key) == pytest.approx(want, rel=0.05), key
    n_opt, d_opt = fit.compute_optimal(1e21)
    assert n_opt * d_opt * 6 == pytest.approx(1e21, rel=1e-9) and 1e9 < n_opt < 1e11  # approach 3's constants: about 2e9 parameters at 1e21 FLOPs


def test_too_few_runs_are_refused():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_loss_law([1e6, 2e6], [1e8, 1e9], [3.0, 2.9])


TRUE = dict(E=1.2, A=50.0, B=900.0, alpha=0.3, beta=0.45)


def law(n, d, c=TRUE):
    return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def test_isoflop_minima_find_the_laws_optimum_and_its_exponent():
    from adl_cli.methods.scaling import isoflop_minima, power_law

    budgets = [1e15, 1e16, 1e17, 1e18]
    grid = np.geomspace(1e4, 1e10, 200_001)
    truth = {b: grid[np.argmin(law(grid, b / (6 * grid)))] for b in budgets}  # a dense search of the law at each budget
    c, n = map(np.array, zip(*[(b, x) for b in budgets for x in np.geomspace(truth[b] / 8, truth[b] * 4, 7)]))  # bracketing, off-centre
    minima = isoflop_minima(c, n, law(n, c / (6 * n)))
    assert [m.flops for m in minima] == pytest.approx(budgets)
    for m, b in zip(minima, budgets):
        assert m.inside and m.n_opt == pytest.approx(truth[b], rel=0.1)
        assert m.n_opt * m.d_opt * 6 == pytest.approx(m.flops)
    _, a = power_law([m.flops for m in minima], [m.n_opt for m in minima])
    assert a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.02)


def test_bootstrap_intervals_cover_the_truth_and_the_holdout_predicts_the_largest_runs():
    from adl_cli.methods.scaling import bootstrap, holdout_check

    rng = np.random.default_rng(3)
    n = np.repeat(np.geomspace(1e5, 5e6, 6), 4)
    d = np.tile(np.geomspace(1e5, 1e7, 4), 6)
    loss = law(n, d) * np.exp(rng.normal(0, 0.005, size=n.shape))
    fit = fit_loss_law(n, d, loss)
    intervals = bootstrap(n, d, loss, fit, samples=60, seed=1)
    for key in ("E", "alpha", "beta"):
        iv = intervals[key]
        assert iv.low < TRUE[key] < iv.high, key
        assert iv.low <= getattr(fit, key) <= iv.high
    assert intervals["alpha"].high - intervals["alpha"].low < 0.5  # informative, not the whole range
    check = holdout_check(n, d, loss, fraction=0.1)
    assert len(check.errors) == 3 and all(c > check.flops_cut for c, _, _ in check.errors)  # the top 10% of 24: C at or above its 0.9 quantile
    assert check.worst < 0.03  # 0.5% noise: the extrapolated law stays within 3%


def test_the_holdout_leaves_a_budgets_runs_out_together():
    from adl_cli.methods.scaling import holdout_check

    budgets = [1e12] * 4 + [2e12] * 4 + [4e12] * 4
    n = np.tile([1e5, 2e5, 4e5, 8e5], 3)
    d = np.array(budgets) / (6 * n)
    check = holdout_check(n, d, law(n, d), fraction=0.1, budget=budgets)
    assert len(check.errors) == 4 and all(c == pytest.approx(4e12) for c, _, _ in check.errors)
    with pytest.raises(ValueError, match="every run"):
        holdout_check(n[:4], d[:4], law(n[:4], d[:4]), budget=budgets[:4])
