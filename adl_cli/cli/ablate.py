"""adl ablate: variants of a recipe at an equal budget, in one table (and one figure)."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import new_output, plot_option, resolve_recipe, set_option


def ablate(
    recipe: Path = typer.Argument(..., help="Recipe TOML or a shipped recipe's name (the baseline).", show_default=False),
    vary: list[str] = typer.Option(None, "--vary", "-v", help="KEY=V1,V2,... : values to try for a recipe key (repeatable).", metavar="KEY=V1,V2"),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per variant (train.seed, train.seed + 1, ...); the spread of the difference to the baseline needs 2 or more."),
    budget_tokens: int = typer.Option(None, "--budget-tokens", help="Tokens each variant trains on (steps = budget / tokens per step of the baseline)."),
    budget_seconds: float = typer.Option(None, "--budget-seconds", help="Seconds of training per variant: a short probe of each variant measures its time per step and sets its steps."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps per variant (default: the recipe's train.steps)."),
    grid: bool = typer.Option(False, "--grid", help="Every combination of the --vary values instead of one change at a time."),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the runs (default: runs/ablate-<recipe name>)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the table and the curves as JSON here."),
    plot: Path = plot_option(),
    plot_x: str = typer.Option("time", "--plot-x", help="The figure's x axis: time (training wall time) or tokens."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out and existing --json / --plot files."),
) -> None:
    """Compare recipe variants at an equal budget of tokens or seconds: [bold]adl ablate tiny --vary model.norm=layernorm,rmsnorm --vary train.optimizer=adamw,muon --seeds 2[/]"""
    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.errors import AdlError
    from adl_cli.methods.ablate import plot_ablation, run_ablation, summary_rows, write_json
    from adl_cli.methods.pretrain import load_pretrain_recipe

    if plot_x not in ("time", "tokens"):
        raise AdlError(f"--plot-x must be time or tokens, got '{plot_x}'")
    json_path, plot = new_output(json_path, force), new_output(plot, force, suffix=".png")
    recipe = resolve_recipe(recipe)
    name = load_pretrain_recipe(recipe, set_).name
    out = out or Path("runs") / f"ablate-{name}"
    console.print(f"[bold]adl ablate[/] {recipe} -> {out}", highlight=False)
    results = run_ablation(recipe, vary, out, seeds=seeds, budget_tokens=budget_tokens, budget_seconds=budget_seconds, steps=steps,
                           overrides=set_, grid=grid, force=force,
                           log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False))
    rows = summary_rows(results)
    budget = f"{budget_seconds:g} s of training each" if budget_seconds is not None else "equal tokens"
    table = Table(title=f"{name}: {len(results[0].seeds)} seed(s) per variant, {budget}", title_justify="left")
    table.add_column("variant", overflow="fold", min_width=20)
    timed = budget_seconds is not None
    for col in ("val bpb", "Δ bpb ± sd", "tok/s") + (("steps",) if timed else ()) + ("train s",):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        sd = f" ± {r['delta_bpb_sd']:.4f}" if r["delta_bpb_sd"] is not None else ""
        delta = "-" if r["variant"] == "baseline" else f"{r['delta_bpb']:+.4f}{sd}"
        steps = (str(r["steps"]),) if timed else ()
        table.add_row(r["variant"], f"{r['val_bpb']:.4f}", delta, f"{r['tokens_per_s']:,.0f}", *steps, f"{r['train_wall_s']:.1f}")
    console.print(table)
    console.print("[dim]val bpb: validation bits per byte, the mean over seeds (their sd and the val loss are in --json); Δ bpb: the mean "
                  "over seeds of (variant - the baseline of the same seed), ± its sd[/]")
    if json_path is not None:
        write_json(results, json_path)
        console.print(f"[dim]table and curves written to {json_path}[/]", highlight=False)
    if plot is not None:
        plot_ablation(results, plot, x="elapsed_s" if plot_x == "time" else "tokens")
        console.print(f"[dim]figure: {plot}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("ablate", rich_help_panel="Train")(ablate)
