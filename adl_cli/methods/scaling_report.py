"""What `adl scaling` makes of a sweep: approach 3's fit with bootstrap intervals, approach 2's
IsoFLOP minima and exponents, the compute-optimal split for a few budgets, and the check that a fit
without the largest runs predicts them. Printed as tables, written as JSON and drawn."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adl_cli.methods.scaling import HoldoutCheck, Interval, IsoFlopMinimum, ScalingFit


@dataclass
class ScalingAnalysis:
    runs: list[dict[str, Any]]
    count: str  # how N was counted
    fit: ScalingFit
    intervals: dict[str, Interval] = field(default_factory=dict)
    minima: list[IsoFlopMinimum] = field(default_factory=list)
    approach2: dict[str, float] | None = None  # exponents a (N_opt ~ C^a) and b (D_opt ~ C^b) from the minima
    optimal: list[dict[str, float]] = field(default_factory=list)  # per budget: C, N, D, tokens per parameter, loss
    holdout: HoldoutCheck | None = None
    holdout_within_epoch: float | None = None  # the hold-out's worst error over its runs that read each training token at most once


def analyse(runs, *, bootstrap_samples: int = 200, holdout: float = 0.1, count: str = "total", seed: int = 0) -> ScalingAnalysis:
    from adl_cli.methods.scaling import bootstrap, fit_loss_law, holdout_check, isoflop_minima, power_law

    rows = [asdict(r) if not isinstance(r, dict) else dict(r) for r in runs]
    n = [r["params"] for r in rows]
    d = [r["tokens"] for r in rows]
    loss = [r["val_loss"] for r in rows]
    fit = fit_loss_law(n, d, loss)
    result = ScalingAnalysis(rows, count, fit)
    if bootstrap_samples:
        result.intervals = bootstrap(n, d, loss, fit, samples=bootstrap_samples, seed=seed)
    result.minima = isoflop_minima([r["budget"] for r in rows], n, loss)
    inside = [m for m in result.minima if m.inside]
    if len(inside) >= 2:
        _, a = power_law([m.flops for m in inside], [m.n_opt for m in inside])
        _, b = power_law([m.flops for m in inside], [m.d_opt for m in inside])
        result.approach2 = {"a": a, "b": b, "budgets": len(inside)}
    top = max(r["budget"] for r in rows)
    for c in (top, 10 * top, 100 * top):
        n_opt, d_opt = fit.compute_optimal(c)
        result.optimal.append({"flops": c, "n": n_opt, "d": d_opt, "tokens_per_param": d_opt / n_opt, "loss": fit.loss(n_opt, d_opt)})
    if holdout > 0:
        try:
            check = holdout_check(n, d, loss, fraction=holdout, budget=[r["budget"] for r in rows])
        except ValueError:  # one budget only, or too few runs below the cut to fit
            check = None
        result.holdout = check
        if check is not None:
            epochs = {round(r["flops"]): r.get("epochs", math.nan) for r in rows}
            within = [abs(p / o - 1) for c, o, p in check.errors if not epochs.get(round(c), math.nan) > 1]
            result.holdout_within_epoch = max(within) if within and len(within) < len(check.errors) else None
    return result


def print_analysis(result: ScalingAnalysis, console, *, title: str) -> None:
    from rich.table import Table

    runs = Table(title=f"{title}: final validation loss", title_justify="left")
    for col in ("run (shape-budget)", "N", "D", "steps", "epochs", "val loss", "val bpb", "train s"):
        runs.add_column(col, justify="left" if col.startswith("run") else "right", no_wrap=True)
    for r in sorted(result.runs, key=lambda r: (r["budget"], r["params"])):
        epochs = r.get("epochs", math.nan)
        runs.add_row(r["name"], _count(r["params"]), _count(r["tokens"]), str(r["steps"]), f"{epochs:.2f}" if epochs == epochs else "-",
                     f"{r['val_loss']:.4f}", f"{r['val_bits_per_byte']:.4f}", f"{r['train_wall_s']:.1f}")
    console.print(runs)
    repeated = sum(1 for r in result.runs if r.get("epochs", 0) > 1)
    if repeated:
        console.print(f"[yellow]note:[/] {repeated} run(s) read their training text more than once (epochs > 1); L(N, D) assumes "
                      "unique tokens, and repeated ones are worth less (Muennighoff et al. 2023)", highlight=False)
    f, iv = result.fit, result.intervals
    law = Table(title=f"L(N, D) = E + A/N^alpha + B/D^beta (approach 3, N = {result.count} parameters)", title_justify="left")
    law.add_column("constant")
    law.add_column("fit", justify="right")
    law.add_column("95% interval (bootstrap)", justify="right")
    values = {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta, "n_exponent": f.n_exponent}
    names = {"n_exponent": "a = beta/(alpha+beta)"}
    for key, value in values.items():
        interval = f"{_num(iv[key].low)} .. {_num(iv[key].high)}" if key in iv else "-"
        law.add_row(names.get(key, key), _num(value), interval)
    console.print(law)
    if result.minima:
        iso = Table(title="IsoFLOP minima (approach 2: a parabola in log N per budget)", title_justify="left")
        for col in ("C", "runs", "N_opt", "D_opt", "D/N", "loss", ""):
            iso.add_column(col, justify="right", no_wrap=True)
        for m in result.minima:
            iso.add_row(f"{m.flops:.1e}", str(m.runs), f"{m.n_opt / 1e6:.3f}M", f"{m.d_opt / 1e6:.2f}M", f"{m.d_opt / m.n_opt:.1f}",
                        f"{m.loss:.4f}", "" if m.inside else "[yellow]outside the sizes run[/]")
        console.print(iso)
    if result.approach2:
        a2 = result.approach2
        console.print(f"approach 2: N_opt ~ C^{a2['a']:.3f}, D_opt ~ C^{a2['b']:.3f} (from {a2['budgets']} budgets); "
                      f"approach 3: N_opt ~ C^{f.n_exponent:.3f}, D_opt ~ C^{1 - f.n_exponent:.3f}", highlight=False)
    else:
        console.print("[dim]approach 2: fewer than 2 budgets have their minimum inside the sizes run; no exponents[/]")
    opt = Table(title="compute-optimal split (approach 3; budgets beyond the sweep are extrapolations)", title_justify="left")
    for col in ("C (FLOPs)", "N_opt", "D_opt", "tokens/param", "loss"):
        opt.add_column(col, justify="right", no_wrap=True)
    for o in result.optimal:
        opt.add_row(f"{o['flops']:.1e}", _count(o["n"]), _count(o["d"]), f"{o['tokens_per_param']:.1f}", f"{o['loss']:.4f}")
    console.print(opt)
    if result.holdout is not None:
        h = result.holdout
        errs = ", ".join(f"{o:.4f} vs {p:.4f}" for _, o, p in h.errors)
        within = result.holdout_within_epoch
        console.print(f"hold-out: a fit on the runs up to C = {h.flops_cut:.2e} predicts the {len(h.errors)} at the top of the compute "
                      f"(observed vs predicted: {errs}); worst error {h.worst:.2%}"
                      + (f", {within:.2%} over those within one epoch" if within is not None else ""), highlight=False)


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _count(v: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def to_dict(result: ScalingAnalysis) -> dict[str, Any]:
    f = result.fit
    out: dict[str, Any] = {
        "runs": result.runs,
        "params_count": result.count,
        "fit": {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta, "n_exponent": f.n_exponent, "objective": f.objective},
        "intervals_95": {k: [v.low, v.high] for k, v in result.intervals.items()},
        "isoflop_minima": [{k: v for k, v in asdict(m).items()} for m in result.minima],
        "approach2": result.approach2,
        "compute_optimal": result.optimal,
    }
    if result.holdout is not None:
        h = result.holdout
        out["holdout"] = {"flops_cut": h.flops_cut, "worst_relative_error": h.worst,
                          "worst_relative_error_within_one_epoch": result.holdout_within_epoch,
                          "runs": [{"flops": c, "observed": o, "predicted": p} for c, o, p in h.errors],
                          "fit": {k: getattr(h.fit, k) for k in ("E", "A", "B", "alpha", "beta")}}
    return out


def write_json(result: ScalingAnalysis, path: Path) -> None:
    from adl_cli.fileio import atomic_write

    atomic_write(path, json.dumps(to_dict(result), indent=1, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))


def write_plot(result: ScalingAnalysis, path: Path, *, title: str) -> None:
    from adl_cli.engine.plots import scaling_figure

    cs = sorted(r["flops"] for r in result.runs)
    lo, hi = math.log(cs[0]), math.log(cs[-1])
    frontier = []
    for i in range(40):
        c = math.exp(lo + (hi - lo) * i / 39)
        frontier.append((c, result.fit.loss(*result.fit.compute_optimal(c))))
    minima = [asdict(m) for m in result.minima if m.inside]  # a minimum outside the sizes run is an extrapolation: listed, not drawn
    parabolas = [{"budget": m.flops, "points": m.curve(clip=True)} for m in result.minima]
    scaling_figure(path, result.runs, frontier=frontier, minima=minima, parabolas=parabolas, title=title)
