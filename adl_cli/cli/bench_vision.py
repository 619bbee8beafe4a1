"""adl bench-vision: every image family on the same data at an equal wall-clock budget, over seeds."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import plot_option, set_option


def bench_vision(
    models: str = typer.Option(None, "--models", help="Families, comma-separated (default: all: vit, axial, swin, perceiver, mixer, "
                               "poolformer, fnet, cnn).", show_default=False),
    budget_seconds: float = typer.Option(60.0, "--budget-seconds", help="Training seconds each family gets (a probe run measures its "
                                         "seconds per step; steps = budget / that)."),
    seeds: int = typer.Option(3, "--seeds", help="Training seeds per family (families alternate their order seed by seed)."),
    set_: list[str] = set_option("data.KEY=VALUE for every family, FAMILY:KEY=VALUE for one family's recipe, e.g. "
                                 "--set data.set=shapes --set vit:model.patch=4 (repeatable)."),
    out: Path = typer.Option(Path("runs/bench-vision"), "--out", "-o", help="Folder of the runs (OUT/<family>/seed-<k>)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier benchmark in --out (and the --plot file)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object (nothing else on stdout)."),
    plot: Path = plot_option(),
) -> None:
    """Image families at an equal budget: [bold]adl bench-vision --models vit,mixer,cnn --budget-seconds 30 --seeds 1[/]
    (--set data.KEY=VALUE picks the data every family trains on: --set data.set=shapes; --set FAMILY:KEY=VALUE sets one
    family's recipe: --set vit:model.patch=4)"""
    import json

    from rich.table import Table

    from adl_cli.cli.common import new_output
    from adl_cli.console import console
    from adl_cli.methods.bench_vision import parse_models, run_bench_vision

    names = parse_models(models)
    plot = new_output(plot, force, "PNG", ".png")
    log = (lambda *a, **k: None) if as_json else console.print
    report = run_bench_vision(names, out, budget_seconds=budget_seconds, seeds=seeds, data_sets=set_, force=force, log=log)
    if plot is not None:
        from adl_cli.engine.vision_plots import bench_vision_figure

        bench_vision_figure(report, plot)
    if as_json:
        print(json.dumps(report))
        return
    d = report["data"]
    t = Table("family", "params", "MFLOP", "steps", "img/s", "test top-1", "range", title=f"{d['set']}, {budget_seconds:g} s of training each, "
              f"median of {seeds} seed(s)", title_justify="left")
    for r in report["rows"]:
        t.add_row(r["family"], f"{r['parameters']:,}", f"{r['flops_per_image'] / 1e6:.2f}", str(r["steps"]), f"{r['images_per_s']:,.0f}",
                  f"{r['test_accuracy']:.2%}", f"{r['test_min']:.1%}-{r['test_max']:.1%}")
    for b in report["baselines"]:
        t.add_row(b["family"].replace(" (pixels)", ""), f"{b['parameters']:,}", "-", "-", "-", f"{b['test_accuracy']:.2%}", "-")
    console.print(t)
    if report["settings"]:
        console.print("families' own settings: " + "; ".join(f"{fam}: {', '.join(sets)}" for fam, sets in report["settings"].items()),
                      highlight=False)
    console.print(f"[dim]MFLOP: forward FLOPs per image; logistic regression on the pixels; test split: "
                  f"{report['baselines'][0]['test_images']} images; runs (validation scores in their summary.json) in {out}[/]", highlight=False)
    if plot is not None:
        console.print(f"figure: {plot}")


def register(app: typer.Typer) -> None:
    app.command("bench-vision", rich_help_panel="Benchmark")(bench_vision)
