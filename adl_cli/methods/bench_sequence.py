"""``adl bench-sequence``: the sequence families side by side on one task at an equal budget.

    models     rnn, gru, lstm, slstm, mlstm, mamba, mamba2, gpt: each its shipped recipe
               (recipes/sequence/<model>.toml), with the task and any settings applied to all
    budget     equal steps (the recipes' own, or --steps) or equal wall time (--budget-seconds:
               a probe run measures each model's seconds per step; steps = budget / that)
    tuning     --tune-lr MODELS: on seed 0, each learning rate of the grid; the one with the best
               validation accuracy (a set the scores never use) is kept for every seed
    seeds      the models alternate their order seed by seed (forward, then backward)
    measured   accuracy on the answers at 1x, 2x and 4x the training length (medians over seeds),
               training tokens/s, greedy decoding tokens/s (batch 1), the decode state's bytes at
               each length (a constant recurrent state against the GPT's growing cache); the
               report also in OUT/report.json

``--task lm``: language modelling on the main job's corpus (recipes/pretrain/tiny.toml's data and
training settings, each model's own [model] section at context ``LM_CONTEXT``) at an equal wall
time; scored in validation bits per byte.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.errors import AdlError, opt, pick

MODELS = ("rnn", "gru", "lstm", "slstm", "mlstm", "mamba", "mamba2", "gpt")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
LM_CONTEXT = 128
DECODE_TOKENS = 64


@dataclass
class ModelResult:
    model: str
    steps: int
    seconds_per_step: float | None = None
    lr: float = 0.0
    lr_trials: dict[str, float] = field(default_factory=dict)  # lr -> validation accuracy (or bits per byte)
    family: str = ""
    parameters: int = 0
    scores: dict[int, list[float]] = field(default_factory=dict)  # length -> accuracy per seed (lm: 0 -> bits per byte)
    tokens_per_s: list[float] = field(default_factory=list)
    train_wall_s: list[float] = field(default_factory=list)
    decode_tokens_per_s: float | None = None
    state_bytes: dict[int, int] = field(default_factory=dict)  # length in tokens -> decode state bytes (batch 1)

    def row(self) -> dict[str, Any]:
        med = statistics.median
        return {"model": self.model, "family": self.family, "parameters": self.parameters, "steps": self.steps, "lr": self.lr,
                "lr_trials": self.lr_trials, "seconds_per_step": self.seconds_per_step, "tokens_per_s": med(self.tokens_per_s),
                "train_wall_s": med(self.train_wall_s), "decode_tokens_per_s": self.decode_tokens_per_s,
                "state_bytes": {str(k): v for k, v in self.state_bytes.items()},
                "scores": {str(n): (med(v) if v else None) for n, v in self.scores.items()},
                "scores_by_seed": {str(n): v for n, v in self.scores.items()}}


def parse_models(models: str | None) -> list[str]:
    return pick("models", models, MODELS, "model")


def _lr_grid(text: str | None) -> list[float]:
    if not text:
        return list(LRS)
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AdlError(f"{opt('lrs')} takes learning rates separated by commas, e.g. 1e-3,3e-3,1e-2, got '{text}'") from None
    if not grid or any(not lr > 0 for lr in grid):
        raise AdlError(f"{opt('lrs')} takes positive learning rates, got '{text}'")
    return grid


def decode_figures(model, prompt: list[int], lengths: list[int], repeats: int = 3) -> tuple[float, dict[int, int]]:
    """Greedy decoding tokens/s at batch 1 (median of ``repeats``) and the decode state's bytes at
    each length: measured for a recurrent state (constant), the cache's bytes per token times
    the length for a model with a cache."""
    from adl_cli.inference.engine import generate_batch

    generate_batch(model, [prompt], 4)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_batch(model, [prompt], DECODE_TOKENS)
        rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    cfg = model.config
    if getattr(cfg, "recurrent", False):
        sizes = {n: model.setup_cache(1, n).nbytes() for n in lengths}
    else:
        per_token = model.setup_cache(1, cfg.block_size).nbytes() / cfg.block_size
        sizes = {n: int(per_token * n) for n in lengths}
    return statistics.median(rates), sizes


def run_bench_sequence(models: list[str], out: Path, *, task: str | None = None, steps: int | None = None, budget_seconds: float | None = None,
                       seeds: int = 3, tune_lr: list[str] | None = None, lrs: str | None = None, settings: list[str] | None = None,
                       force: bool = False, probe_steps: int = 20, log=print) -> dict[str, Any]:
    import shutil

    from adl_cli.methods.bench_vision import split_settings

    if seeds < 1:
        raise AdlError(f"{opt('seeds')} must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise AdlError(f"{opt('steps')} must be >= 1, got {steps}")
    if budget_seconds is not None and not budget_seconds > 0:
        raise AdlError(f"{opt('budget_seconds')} must be a positive number of seconds, got {budget_seconds}")
    if steps is not None and budget_seconds is not None:
        raise AdlError(f"{opt('steps')} (equal steps) and {opt('budget_seconds')} (equal wall time) are two budgets: give one")
    tune = list(tune_lr or [])
    for m in tune:
        if m not in models:
            raise AdlError(f"{opt('tune_lr')}: '{m}' is not among the models benchmarked ({', '.join(models)})")
    grid = _lr_grid(lrs)
    out = Path(out)
    lm = task == "lm"
    shared, own = split_settings(list(settings or []), models, ("train",) if lm else ("task", "train"), "mamba:model.d_state=8")
    if task and not lm:
        shared = [f"task.name={task}", *shared]
    if lm:
        budget_seconds = budget_seconds or 60.0
    bench = _LMBench(models, shared, own) if lm else _TaskBench(models, shared, own)  # every recipe and setting checked first
    if out.exists() and any(out.iterdir()) and not force:
        raise AdlError(f"{out} is not empty (an earlier benchmark?); choose another {opt('out')} or pass {opt('force')} to replace it")
    if force and out.exists():
        shutil.rmtree(out)
    bench.prepare(out)
    results: dict[str, ModelResult] = {}
    for m in models:
        if budget_seconds is not None:
            per_step = bench.seconds_per_step(m, out / "probe", probe_steps)
            results[m] = ModelResult(m, max(1, int(budget_seconds / per_step)), per_step)
            log(f"{m}: {per_step * 1000:.1f} ms per step in a {probe_steps}-step probe -> {results[m].steps} steps in {budget_seconds:g} s")
        else:
            results[m] = ModelResult(m, steps or bench.recipe_steps(m))
        results[m].lr = bench.recipe_lr(m)
    done: dict[str, dict[str, Any]] = {}  # model -> its seed-0 summary, when tuning ran it
    for m in tune:
        r, best = results[m], None
        for lr in grid:
            folder = out / m / f"lr-{lr:g}"
            log(f"{m}, seed 0, lr {lr:g}: {r.steps} steps -> {folder}")
            s = bench.run(m, folder, seed=0, steps=r.steps, lr=lr)
            r.lr_trials[f"{lr:g}"] = bench.validation(s)
            if best is None or bench.better(r.lr_trials[f"{lr:g}"], best[1]):
                best = (lr, r.lr_trials[f"{lr:g}"], s)
        r.lr, done[m] = best[0], best[2]
        log(f"{m}: learning rate {best[0]:g} (validation {best[1]:.4g})")
    for i in range(seeds):
        for m in models if i % 2 == 0 else list(reversed(models)):
            r = results[m]
            if i == 0 and m in done:
                s = done[m]
            else:
                folder = out / m / f"seed-{i}"
                log(f"{m}, seed {i}: {r.steps} steps -> {folder}")
                s = bench.run(m, folder, seed=i, steps=r.steps, lr=r.lr)
            bench.collect(r, s)
            if i == 0:
                bench.decode(r, Path(s["run_dir"]))
    report = {"task": bench.task_name, "budget": {"steps": steps, "budget_seconds": budget_seconds}, "seeds": seeds, "probe_steps": probe_steps,
              "lengths": bench.lengths, "lr_grid": grid if tune else [], "settings": {m: own[m] for m in models if own[m]},
              "shared_settings": shared, "rows": [results[m].row() for m in models]}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report


class _TaskBench:
    """The synthetic tasks: `adl sequence` runs of each model's shipped recipe."""

    def __init__(self, models, shared, own):
        from adl_cli.cli.recipes import find_recipe
        from adl_cli.methods.sequence import load_sequence_recipe

        self.recipes = {m: find_recipe(f"sequence/{m}") for m in models}
        self.sets = {m: shared + own[m] for m in models}
        self.loaded = {m: load_sequence_recipe(path, self.sets[m]) for m, path in self.recipes.items()}
        tasks = {(r.task.name, r.task.length, tuple(r.task.eval_lengths), tuple(sorted(r.task.options.items()))) for r in self.loaded.values()}
        if len(tasks) > 1:
            raise AdlError("the models' recipes pose different tasks; set one for all with --task and --set task.KEY=VALUE")
        first = next(iter(self.loaded.values())).task
        self.task_name, self.lengths = first.name, [first.length, *first.eval_lengths]

    def prepare(self, out: Path) -> None:
        pass

    def recipe_steps(self, m):
        return self.loaded[m].train.steps

    def recipe_lr(self, m):
        return self.loaded[m].train.lr

    def seconds_per_step(self, m, folder, probe_steps):
        from adl_cli.methods.ablate import seconds_per_step
        from adl_cli.methods.sequence import load_sequence_recipe, run_sequence

        return seconds_per_step(self.recipes[m], self.sets[m], folder, probe_steps, load=load_sequence_recipe, run=run_sequence, extra_sets=())

    def run(self, m, folder, *, seed, steps, lr):
        from adl_cli.methods.sequence import load_sequence_recipe, run_sequence

        sets = self.sets[m] + [f"train.seed={seed}", f"train.steps={steps}", f"train.lr={lr}", "train.checkpoint_every=0", "train.eval_every=0"]
        s = run_sequence(load_sequence_recipe(self.recipes[m], sets), folder, progress=None, log=lambda *a, **k: None).summary
        return {**s, "run_dir": str(folder)}

    @staticmethod
    def validation(s):
        return s["val"]["accuracy"]

    @staticmethod
    def better(a, b):
        return a > b

    def collect(self, r: ModelResult, s):
        r.family, r.parameters = s["family"], s["parameters"]
        for score in s["scores"]:
            r.scores.setdefault(score["length"], [])
            if "accuracy" in score:
                r.scores[score["length"]].append(score["accuracy"])
        r.tokens_per_s.append(s["tokens_per_s"])
        r.train_wall_s.append(s["train_wall_s"])

    def decode(self, r: ModelResult, run_dir: Path):
        from adl_cli.methods.sequence import _task
        from adl_cli.runs import load_run

        recipe = self.loaded[r.model]
        task = _task(recipe.task)
        model = load_run(run_dir).model
        x, _ = task.batch(1, recipe.task.length, torch.Generator().manual_seed(0))
        tokens = [task.spec(n).seq_len for n in self.lengths]
        r.decode_tokens_per_s, r.state_bytes = decode_figures(model, x[0].tolist(), tokens)


class _LMBench:
    """Language modelling: `adl pretrain` runs on the main job's corpus, each model's [model]
    section from its sequence recipe at context LM_CONTEXT."""

    task_name = "lm"

    def __init__(self, models, shared, own):
        import tempfile

        from adl_cli.cli.recipes import find_recipe
        from adl_cli.methods.pretrain import load_pretrain_recipe
        from adl_cli.methods.sequence import lm_pretrain_recipe, load_sequence_recipe
        from adl_cli.recipe import dump_recipe

        self.texts = {}
        for m in models:
            recipe = lm_pretrain_recipe(load_sequence_recipe(find_recipe(f"sequence/{m}")).model, f"lm-{m}", LM_CONTEXT)
            self.texts[m] = dump_recipe(recipe, header=f"adl bench-sequence --task lm: recipes/sequence/{m}.toml's model on "
                                                       f"recipes/pretrain/tiny.toml's data and training")
        self.sets = {m: shared + own[m] for m in models}
        self.lengths = [LM_CONTEXT]
        with tempfile.TemporaryDirectory() as tmp:  # every recipe and setting checked before anything is written
            for m in models:
                path = Path(tmp) / f"lm-{m}.toml"
                path.write_text(self.texts[m])
                load_pretrain_recipe(path, self.sets[m])
        self.recipes: dict[str, Path] = {}

    def prepare(self, out: Path) -> None:
        """The recipes the runs read, kept with the benchmark (OUT/recipes/lm-<model>.toml)."""
        from adl_cli.methods.pretrain import load_pretrain_recipe

        (out / "recipes").mkdir(parents=True, exist_ok=True)
        for m, text in self.texts.items():
            self.recipes[m] = out / "recipes" / f"lm-{m}.toml"
            self.recipes[m].write_text(text)
        self.loaded = {m: load_pretrain_recipe(path, self.sets[m]) for m, path in self.recipes.items()}

    def recipe_steps(self, m):
        return self.loaded[m].train.steps

    def recipe_lr(self, m):
        return self.loaded[m].train.lr

    def seconds_per_step(self, m, folder, probe_steps):
        from adl_cli.methods.ablate import seconds_per_step

        return seconds_per_step(self.recipes[m], self.sets[m], folder, probe_steps)

    def run(self, m, folder, *, seed, steps, lr):
        from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

        sets = self.sets[m] + [f"train.seed={seed}", f"train.steps={steps}", f"train.lr={lr}", "train.checkpoint_every=0",
                               f"train.eval_every={steps}"]
        s = run_pretrain(load_pretrain_recipe(self.recipes[m], sets), folder, progress=None, log=lambda *a, **k: None).summary
        return {**s, "run_dir": str(folder)}

    @staticmethod
    def validation(s):
        return s["val_bits_per_byte"]

    @staticmethod
    def better(a, b):
        return a < b

    def collect(self, r: ModelResult, s):
        r.family = self.loaded[r.model].model.family
        r.parameters = s.get("parameters", 0)
        r.scores.setdefault(0, []).append(s["val_bits_per_byte"])
        r.tokens_per_s.append(s["tokens_per_s"])
        r.train_wall_s.append(s["train_wall_s"])

    def decode(self, r: ModelResult, run_dir: Path):
        from adl_cli.runs import load_run

        model = load_run(run_dir).model
        r.decode_tokens_per_s, r.state_bytes = decode_figures(model, list(range(1, 33)), [LM_CONTEXT])
