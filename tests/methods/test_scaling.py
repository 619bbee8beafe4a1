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
