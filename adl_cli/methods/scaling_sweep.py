"""The scaling sweep behind `adl scaling`: models of several sizes, each trained to several compute
budgets, then both Chinchilla fits (``adl_cli.methods.scaling``).

    sizes   = shapes "LxE" (L layers of width E, heads of 64 dims), the rest of [model] from the recipe
    budgets = compute C in FLOPs; a run of N parameters gets D = C / (6 N) tokens
              (steps = D / tokens per step, rounded; a run under ``min_steps`` is left out, and so is
              one that would read its training text more than ``max_epochs`` times)
    for each run, smallest compute first:  run_pretrain(recipe + shape + steps), its own run folder

Every run keeps the recipe's data, tokenizer, optimizer and schedule (its warmup capped at a tenth
of the run), so the fits see one training recipe at many (N, D). The loss is the final validation
loss over the whole held-out split. A sweep folder that already holds finished runs is continued
with ``resume``: each run whose summary.json records the planned steps and N is read, not
retrained; one that records others (the recipe or the grid changed) stops the sweep untouched.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError, opt

# 12-18 minutes on 2 cores (Intel AMX host, bf16) with the tiny recipe (2,048 tokens a step):
# 6 sizes x 4 budgets, less the runs under MIN_STEPS. Every shape has 2 layers or more: a 1-layer
# transformer cannot compose attention heads (no induction heads, Olsson et al. 2022) and its loss
# stalls at many tokens per parameter where the law keeps falling (benchmarks/RESULTS.md).
DEFAULT_SIZES = "2x48,2x64,2x96,2x128,3x160,4x256"
DEFAULT_BUDGETS = "1.5e12,3e12,6e12,1.2e13"
# Runs of fewer optimizer steps are limited by optimisation (warmup, too few updates) rather than
# by data or capacity, which is what L(N, D) describes: they are left out of the sweep.
MIN_STEPS = 100
# L(N, D) is a law of unique tokens: a run that reads its text twice learns less from the second
# pass (Muennighoff et al. 2023), which the law does not model. Runs over this many epochs are
# left out; more text is the cure (data.extra_train = ["stdlib", "stdlib-tests"]).
MAX_EPOCHS = 1.0
# The --quick grid (the tests, a first look; about a minute): three small shapes, and budgets that
# give the smallest 40, 80 and 160 optimizer steps of the recipe's batch.
QUICK_SIZES = "1x32,1x48,1x64"
QUICK_STEPS = (40, 80, 160)


@dataclass
class PlannedRun:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    params: int  # N as counted for the fit (see ``count``)
    steps: int
    tokens: int  # D = steps x tokens per step
    budget: float  # the C this run was planned for
    flops: float  # 6 N D as trained (steps are whole)


@dataclass
class SweepRun(PlannedRun):
    val_loss: float = math.nan
    val_bits_per_byte: float = math.nan
    train_wall_s: float = math.nan
    tokens_per_s: float = math.nan
    epochs: float = math.nan  # D over the training tokens available: above 1 the run repeats data, which L(N, D) does not model


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        layers, sep, width = item.strip().lower().partition("x")
        try:
            shape = (int(layers), int(width))
        except ValueError:
            shape = (0, 0)
        if not sep or shape[0] < 1 or shape[1] < 8:
            raise AdlError(f"{opt('sizes')} takes LAYERSxWIDTH,... (e.g. 2x128,4x256), got '{item.strip()}'")
        out.append(shape)
    if len(set(out)) < 2:
        raise AdlError(f"{opt('sizes')} needs at least 2 different shapes, got '{spec}'")
    return sorted(set(out))


def parse_budgets(spec: str) -> list[float]:
    try:
        out = sorted({float(f"{float(v):.3g}") for v in spec.split(",") if v.strip()})  # 3 digits: what run names show
    except ValueError:
        raise AdlError(f"{opt('budgets')} takes FLOP counts, e.g. 1e12,2e12,4e12; got '{spec}'") from None
    if not out or out[0] <= 0 or not all(math.isfinite(v) for v in out):
        raise AdlError(f"{opt('budgets')} takes positive FLOP counts, e.g. 1e12,2e12,4e12; got '{spec}'")
    return out


def heads_for(width: int) -> int:
    """Heads of 64 dimensions where the width divides by 64 (128: 2), else of 32 (96: 3, 160: 5),
    else one head (48: 1)."""
    if width % 64 == 0:
        return max(1, width // 64)
    return width // 32 if width % 32 == 0 and width >= 64 else 1


def plan(recipe_path: Path, overrides: list[str], sizes: list[tuple[int, int]], budgets: list[float] | None, *,
         count: str = "total", min_steps: int = MIN_STEPS, max_epochs: float | None = MAX_EPOCHS) -> tuple[list[PlannedRun], list[str]]:
    """(the runs, a note for each run left out). N comes from building each shape once (with the
    recipe's tokenizer's vocabulary). Without ``budgets``, the quick ones: the smallest shape
    trains for QUICK_STEPS steps. ``max_epochs`` None: no limit on repeating the training text."""
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.models import build_model

    if count not in ("total", "non-embedding"):
        raise AdlError(f"{opt('params')} must be total or non-embedding, got '{count}'")
    overrides = list(overrides or [])
    recipe = load_pretrain_recipe(recipe_path, overrides)
    data = load_tokens(recipe.data)
    vocab, available = data.tokenizer.vocab_size, len(data.train)
    tokens_per_step = recipe.train.batch_size * recipe.model.block_size * max(1, recipe.train.grad_accum)
    shapes = []
    for layers, width in sizes:
        heads = heads_for(width)
        try:
            cfg = load_pretrain_recipe(recipe_path, overrides + _shape_sets(layers, width, heads)).model.with_vocab(vocab)
        except AdlError as e:
            raise AdlError(f"size {layers}x{width}: {e}") from None
        shapes.append((layers, width, heads, build_model(cfg).num_params(non_embedding=count == "non-embedding")))
    if budgets is None:
        smallest = min(n for *_, n in shapes)
        budgets = [float(f"{6.0 * smallest * steps * tokens_per_step:.2g}") for steps in QUICK_STEPS]
    runs, skipped = [], []
    for layers, width, heads, n in shapes:
        for c in budgets:
            steps = round(c / (6 * n) / tokens_per_step)
            name = f"{layers}x{width}-C{c:.3g}".replace("+", "")
            if steps < min_steps:
                skipped.append(f"{name}: {steps} steps (under {min_steps}) at this budget")
                continue
            d = steps * tokens_per_step
            if max_epochs is not None and d > max_epochs * available:
                skipped.append(f"{name}: {d / available:.2f} epochs of the {available:,} training tokens (over {max_epochs:g}; "
                               f"add text with data.extra_train, or raise {opt('max_epochs')})")
                continue
            runs.append(PlannedRun(name, layers, width, heads, n, steps, d, c, 6.0 * n * d))
    runs.sort(key=lambda r: (r.flops, r.params))
    return runs, skipped


def _shape_sets(layers: int, width: int, heads: int) -> list[str]:
    return [f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={heads}"]


def run_sweep(recipe_path: Path, out: Path, runs: list[PlannedRun], *, overrides: list[str] | None = None, resume: bool = False,
              force: bool = False, log=print) -> list[SweepRun]:
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise AdlError(f"{out} is not empty (an earlier sweep?); pass {opt('resume')} to continue it, {opt('force')} to replace it, "
                           f"or choose another {opt('out')}")
    base = load_pretrain_recipe(recipe_path, overrides or [])
    done: list[SweepRun] = []
    for r in runs:  # a finished run that the plan would train differently is a changed recipe: refuse before anything is lost
        summary = _summary(out / r.name)
        if summary is not None and (summary.get("steps") != r.steps or r.params not in (summary.get("parameters"), summary.get("parameters_non_embedding"))):
            raise AdlError(f"{out / r.name} was trained with {summary.get('steps')} steps and {summary.get('parameters', 0):,} parameters; "
                           f"the plan now gives {r.steps} and {r.params:,} (the recipe or the grid changed): continue it with the "
                           f"recipe it used ({out / r.name / 'recipe.toml'}), or pass {opt('force')} to retrain the sweep")
    for i, r in enumerate(runs, 1):
        folder = out / r.name
        previous = _finished(folder, r.steps)
        if previous is None:
            if folder.exists():
                shutil.rmtree(folder)  # an unfinished run of this sweep (no summary.json): trained again
            log(f"[{i}/{len(runs)}] {r.name}: N {r.params:,}, D {r.tokens:,} tokens ({r.steps} steps), C {r.flops:.2e}")
            warmup = min(base.train.warmup, max(1, r.steps // 10))
            sets = list(overrides or []) + _shape_sets(r.n_layer, r.n_embd, r.n_head) + [
                f"train.steps={r.steps}", f"train.warmup={warmup}", "train.checkpoint_every=0", "train.eval_every=0",
                "sample_tokens=8", f"name={r.name}"]
            previous = run_pretrain(load_pretrain_recipe(recipe_path, sets), folder, progress=None, log=lambda *a, **k: None).summary
        else:
            log(f"[{i}/{len(runs)}] {r.name}: finished earlier, read from {folder}")
        done.append(SweepRun(**asdict(r), val_loss=float(previous["val_loss"]), val_bits_per_byte=float(previous["val_bits_per_byte"]),
                             train_wall_s=float(previous["train_wall_s"]), tokens_per_s=float(previous["tokens_per_s"]),
                             epochs=r.tokens / max(1, int(previous.get("train_tokens_available") or 0)) if previous.get("train_tokens_available") else math.nan))
    return done


def _summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(folder: Path, steps: int) -> dict[str, Any] | None:
    summary = _summary(folder)
    return summary if summary is not None and summary.get("steps") == steps and summary.get("val_loss") is not None else None
