"""Ablations: one recipe, variants that each change a few keys, trained at an equal token budget.

    variants = baseline (the recipe) + one per changed value of each --vary key (one factor at a
               time: the ladder), or the cartesian product of every --vary (grid)
    for seed in seeds:             the variants run in alternating order (forward, then backward),
        for variant in order:      so a slow drift of the machine's load hits every variant alike
            run_pretrain(recipe + variant's overrides + seed, steps = budget / tokens per step)

A budget in seconds of training gives each variant its own step count: a short probe run of the
variant measures its seconds per optimizer step (``train_s`` of its log rows, the first steps left
out), and steps = budget / that. Every seed of a variant trains the same steps, so the pairing by
seed compares equal schedules; the table shows the training time each run actually took.

Reported per variant: validation bits per byte and loss (mean and spread over seeds), tokens/s,
training wall time, and the difference to the baseline in bits per byte with its spread (the
standard deviation of the per-seed differences, which pairs each variant with the baseline of its
own seed). Each run is an ordinary run folder under the ablation's folder.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError, opt


@dataclass
class Variant:
    name: str
    overrides: list[str]


@dataclass
class VariantResult:
    name: str
    overrides: list[str]
    seeds: list[int]
    val_bpb: list[float]
    val_loss: list[float]
    tokens_per_s: list[float]
    train_wall_s: list[float]
    curves: list[list[dict[str, Any]]] = field(default_factory=list)  # per seed: rows with step, tokens, elapsed_s, val_loss
    steps: int = 0
    delta_bpb: list[float] = field(default_factory=list)  # per seed: this variant minus the baseline of that seed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def parse_varies(varies: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for item in varies or []:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise AdlError(f"{opt('vary')} takes KEY=V1,V2,... (e.g. model.norm=layernorm,rmsnorm), got '{item}'")
        out.append((key.strip(), vals))
    if not out:
        raise AdlError(f"give at least one {opt('vary')} KEY=V1,V2")
    return out


def make_variants(recipe_path: Path, base_overrides: list[str], varies: list[tuple[str, list[str]]], grid: bool) -> list[Variant]:
    """The baseline and its variants; a value the recipe already has is the baseline, not a variant.
    Every variant's recipe is read (so a bad key or value fails before anything trains)."""
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.recipe import recipe_dict

    base = recipe_dict(load_pretrain_recipe(recipe_path, base_overrides))

    def current(key: str):
        node: Any = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def same(key: str, value: str) -> bool:
        from adl_cli.recipe import _parse_scalar

        return current(key) == _parse_scalar(value) or str(current(key)) == value

    variants = [Variant("baseline", [])]
    if grid:
        for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in varies]):
            changed = [(k, v) for k, v in combo if not same(k, v)]
            if changed:
                variants.append(Variant(" ".join(f"{k}={v}" for k, v in changed), [f"{k}={v}" for k, v in changed]))
    else:
        for k, vals in varies:
            for v in vals:
                if not same(k, v):
                    variants.append(Variant(f"{k}={v}", [f"{k}={v}"]))
    if len(variants) == 1:
        raise AdlError(f"every {opt('vary')} value is already the recipe's: nothing to compare with the baseline")
    for v in variants:
        try:
            load_pretrain_recipe(recipe_path, base_overrides + v.overrides)
        except AdlError as e:
            raise AdlError(f"variant {v.name}: {e}") from None
    return variants


def run_ablation(recipe_path: Path, varies: list[str], out: Path, *, seeds: int = 1, budget_tokens: int | None = None,
                 budget_seconds: float | None = None, steps: int | None = None, overrides: list[str] | None = None, grid: bool = False,
                 force: bool = False, probe_steps: int = 25, log=print) -> list[VariantResult]:
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    if seeds < 1:
        raise AdlError(f"{opt('seeds')} must be >= 1, got {seeds}")
    if sum(x is not None for x in (budget_tokens, budget_seconds, steps)) > 1:
        raise AdlError(f"give one of {opt('budget_tokens')}, {opt('budget_seconds')} and {opt('steps')}")
    if budget_seconds is not None and not (budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise AdlError(f"{opt('budget_seconds')} must be a positive number of seconds, got {budget_seconds}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise AdlError(f"{out} is not empty (an earlier ablation?); choose another {opt('out')} or pass {opt('force')} to replace it")
    base_overrides = list(overrides or [])
    variants = make_variants(recipe_path, base_overrides, parse_varies(varies), grid)
    base_recipe = load_pretrain_recipe(recipe_path, base_overrides)
    tokens_per_step = base_recipe.train.batch_size * base_recipe.model.block_size * max(1, base_recipe.train.grad_accum)
    if budget_tokens is not None:
        if budget_tokens < tokens_per_step:
            raise AdlError(f"{opt('budget_tokens')} {budget_tokens:,} is less than one step ({tokens_per_step:,} tokens)")
        steps = budget_tokens // tokens_per_step
    steps = steps or base_recipe.train.steps
    if steps < 1:
        raise AdlError(f"{opt('steps')} must be >= 1, got {steps}")
    if force and out.exists():
        import shutil

        shutil.rmtree(out)
    base_seed = base_recipe.train.seed
    steps_of = {v.name: steps for v in variants}
    if budget_seconds is not None:
        for v in variants:
            per_step = seconds_per_step(recipe_path, base_overrides + v.overrides, out / "probe", probe_steps)
            steps_of[v.name] = max(1, int(budget_seconds / per_step))
            log(f"{v.name}: {per_step * 1000:.0f} ms per step in a {probe_steps}-step probe -> {steps_of[v.name]} steps in {budget_seconds:g} s")
    results = {v.name: VariantResult(v.name, v.overrides, [], [], [], [], [], steps=steps_of[v.name]) for v in variants}
    for i in range(seeds):
        seed = base_seed + i
        order = variants if i % 2 == 0 else list(reversed(variants))
        for v in order:
            folder = out / _slug(v.name) / f"seed-{seed}"
            n = steps_of[v.name]
            sets = base_overrides + v.overrides + [f"train.seed={seed}", f"train.steps={n}", "train.checkpoint_every=0"]
            log(f"{v.name}, seed {seed}: {n} steps -> {folder}")
            outcome = run_pretrain(load_pretrain_recipe(recipe_path, sets), folder, progress=None, log=lambda *a, **k: None)
            s = outcome.summary
            r = results[v.name]
            r.seeds.append(seed)
            r.val_bpb.append(float(s["val_bits_per_byte"]))
            r.val_loss.append(float(s["val_loss"]))
            r.tokens_per_s.append(float(s["tokens_per_s"]))
            r.train_wall_s.append(float(s["train_wall_s"]))
            r.curves.append(_curve(folder / "metrics.jsonl", s["tokens"] / max(1, s["steps"])))
    base = results["baseline"]
    for r in results.values():
        r.delta_bpb = [a - b for a, b in zip(r.val_bpb, base.val_bpb)]
    return [results[v.name] for v in variants]


def seconds_per_step(recipe_path: Path, sets: list[str], folder: Path, probe_steps: int, *, load=None, run=None,
                     extra_sets: tuple[str, ...] = ("sample_tokens=1",)) -> float:
    """Training seconds per optimizer step of a recipe, from a short run's log rows (``train_s``
    leaves evaluations out; the first fifth of the steps, warm-up of caches and allocator, too).
    ``load`` / ``run``: the command's recipe loader and runner (default: pretraining's)."""
    import shutil

    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    load, run = load or load_pretrain_recipe, run or run_pretrain
    probe_steps = max(10, probe_steps)
    sets = sets + [f"train.steps={probe_steps}", "train.checkpoint_every=0", "train.eval_every=0", "train.eval_batches=1",
                   "train.log_every=1", *extra_sets]
    try:
        run(load(recipe_path, sets), folder, progress=None, force=True, log=lambda *a, **k: None)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timed = [(r["step"], r["train_s"]) for r in rows if "train_s" in r]
    (s0, t0), (s1, t1) = timed[len(timed) // 5], timed[-1]
    return (t1 - t0) / max(1, s1 - s0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "variant"


def _curve(metrics: Path, tokens_per_step: float) -> list[dict[str, Any]]:
    """Validation loss against step, tokens and wall time (the wall time of the logging row at or
    before each evaluation)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    elapsed, out = 0.0, []
    for row in rows:
        if "elapsed_s" in row:
            elapsed = row["elapsed_s"]
        if "val_loss" in row:
            out.append({"step": row["step"], "tokens": row["step"] * tokens_per_step, "elapsed_s": elapsed, "val_loss": row["val_loss"]})
    return out


def summary_rows(results: list[VariantResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        spread = statistics.stdev(r.delta_bpb) if len(r.delta_bpb) > 1 else None
        rows.append({
            "variant": r.name,
            "val_bpb": statistics.fmean(r.val_bpb),
            "val_bpb_sd": statistics.stdev(r.val_bpb) if len(r.val_bpb) > 1 else None,
            "val_loss": statistics.fmean(r.val_loss),
            "tokens_per_s": statistics.median(r.tokens_per_s),
            "train_wall_s": statistics.median(r.train_wall_s),
            "delta_bpb": statistics.fmean(r.delta_bpb) if r.name != "baseline" else 0.0,
            "delta_bpb_sd": spread if r.name != "baseline" else None,
            "seeds": len(r.seeds),
            "steps": r.steps,
        })
    return rows


def plot_ablation(results: list[VariantResult], path: Path, *, x: str = "elapsed_s") -> None:
    """Validation loss against wall time (or tokens) for every variant: with several seeds, the
    mean over seeds at each evaluation (one line per variant)."""
    from adl_cli.engine.plots import series_figure

    series = {}
    for r in results:
        curves = [c for c in r.curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        series[r.name] = [(statistics.fmean(c[i][x] for c in curves), statistics.fmean(c[i]["val_loss"] for c in curves)) for i in range(n)]
    xlabel = "training wall time (s)" if x == "elapsed_s" else "tokens trained"
    seeds = len(results[0].seeds)
    title = "ablation: validation loss" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
    series_figure(path, series, title=title, xlabel=xlabel, ylabel="val loss (nats per token)")


def write_json(results: list[VariantResult], path: Path) -> None:
    from adl_cli.fileio import atomic_write

    data = {"summary": summary_rows(results), "variants": [r.to_dict() for r in results]}
    atomic_write(path, json.dumps(data, indent=1, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))
