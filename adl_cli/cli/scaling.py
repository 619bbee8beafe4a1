"""adl scaling: a sweep over model size and tokens, and Chinchilla's fits of it."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import new_output, plot_option, resolve_recipe, set_option


def scaling(
    recipe: Path = typer.Argument("tiny", help="Recipe TOML or a shipped recipe's name: the data, tokenizer, optimizer and schedule of every run."),
    sizes: str = typer.Option(None, "--sizes", help="Model shapes LAYERSxWIDTH,... (heads of 64 dims where the width allows, else 32). Default: 2x48,2x64,2x96,2x128,3x160,4x256; with --quick: 1x32,1x48,1x64."),
    budgets: str = typer.Option(None, "--budgets", help="Compute budgets in FLOPs; a run of N parameters trains on C / 6N tokens. Default: 1.5e12,3e12,6e12,1.2e13 (12-18 minutes on 2 cores with the tiny recipe); with --quick: those giving the smallest model 40, 80 and 160 steps."),
    quick: bool = typer.Option(False, "--quick", help="A small grid of tiny models (about a minute on 2 cores): a first look, and the tests."),
    params: str = typer.Option("total", "--params", help="N counts every parameter (total, as Chinchilla) or all but the position embeddings (non-embedding)."),
    min_steps: int = typer.Option(None, "--min-steps", help="Leave out runs that a budget gives fewer optimizer steps than this (optimisation-limited). Default: 100; with --quick: 20."),
    max_epochs: float = typer.Option(None, "--max-epochs", help="Leave out runs that would read the training text more than this many times (L(N, D) is a law of unique tokens). Default: 1; with --quick: no limit."),
    bootstrap_samples: int = typer.Option(200, "--bootstrap", help="Resamples of the runs for the 95% intervals of the fitted constants (0: none)."),
    holdout: float = typer.Option(0.1, "--holdout", help="The top fraction of compute (a budget's runs together) left out of a second fit whose predictions of them are checked."),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the runs (default: runs/scaling-<recipe name>, or -quick)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a sweep in --out: finished runs are read, the others trained."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out and existing --json / --plot files."),
    json_path: Path = typer.Option(None, "--json", help="Write the runs, the fits, their intervals and the compute-optimal table as JSON here."),
    plot: Path = plot_option(),
) -> None:
    """Fit a scaling law to a sweep over size and tokens: [bold]adl scaling tiny --plot scaling.png --json scaling.json[/]"""
    from adl_cli.console import console
    from rich.markup import escape

    from adl_cli.errors import AdlError, opt, render
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.methods.scaling_report import analyse, print_analysis, write_json, write_plot
    from adl_cli.methods.scaling_sweep import (
        DEFAULT_BUDGETS, DEFAULT_SIZES, MAX_EPOCHS, MIN_STEPS, QUICK_SIZES, parse_budgets, parse_sizes, plan, run_sweep,
    )

    if bootstrap_samples < 0:
        raise AdlError(f"{opt('bootstrap')} must be >= 0, got {bootstrap_samples}")
    if not 0.0 <= holdout < 0.5:
        raise AdlError(f"{opt('holdout')} must be in [0, 0.5), got {holdout}")
    min_steps = min_steps if min_steps is not None else (20 if quick else MIN_STEPS)
    if min_steps < 1:
        raise AdlError(f"{opt('min_steps')} must be >= 1, got {min_steps}")
    if max_epochs is not None and not max_epochs > 0:
        raise AdlError(f"{opt('max_epochs')} must be > 0, got {max_epochs}")
    json_path, plot = new_output(json_path, force, suffix=".json"), new_output(plot, force, suffix=".png")
    recipe = resolve_recipe(recipe)
    loaded = load_pretrain_recipe(recipe, set_)
    name = loaded.name
    if loaded.data.corpus_repeat > 1:
        console.print(f"[yellow]note:[/] data.corpus_repeat = {loaded.data.corpus_repeat} repeats the corpus's own text within each pass: "
                      "the fit counts those repeats as new tokens (--set data.corpus_repeat=1 keeps D unique)", highlight=False)
    shapes = parse_sizes(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    flops = parse_budgets(budgets) if budgets else (None if quick else parse_budgets(DEFAULT_BUDGETS))
    out = out or Path("runs") / f"scaling-{name}{'-quick' if quick else ''}"
    runs, skipped = plan(recipe, set_, shapes, flops, count=params, min_steps=min_steps,
                         max_epochs=max_epochs if max_epochs is not None else (None if quick else MAX_EPOCHS))
    for note in skipped:
        console.print(f"[yellow]left out:[/] {escape(render(note, cli=True))}", highlight=False)
    if len(runs) < 5:
        raise AdlError(f"the sweep plans {len(runs)} runs; a fit needs at least 5: add {opt('sizes')} or {opt('budgets')}, or lower {opt('min_steps')}")
    tokens = sum(r.tokens for r in runs)
    console.print(f"[bold]adl scaling[/] {recipe} -> {out}: {len(runs)} runs, {len(shapes)} sizes x {len({r.budget for r in runs})} budgets, "
                  f"{tokens:,} tokens in all", highlight=False)
    done = run_sweep(recipe, out, runs, overrides=set_, resume=resume, force=force,
                     log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False))
    result = analyse(done, bootstrap_samples=bootstrap_samples, holdout=holdout, count=params)
    print_analysis(result, console, title=f"{name}: {len(done)} runs")
    if json_path is not None:
        write_json(result, json_path)
        console.print(f"[dim]runs and fits written to {json_path}[/]", highlight=False)
    if plot is not None:
        write_plot(result, plot, title=f"adl scaling: {name}, {len(done)} runs ({params} parameters)")
        console.print(f"[dim]figure: {plot}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("scaling", rich_help_panel="Train")(scaling)
