"""adl bench-sequence: the sequence families on one task at an equal budget, over seeds."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import plot_option, set_option


def bench_sequence(
    models: str = typer.Option(None, "--models", help="Models, comma-separated (default: all: rnn, gru, lstm, slstm, mlstm, mamba, "
                               "mamba2, gpt), each its recipes/sequence/<model>.toml.", show_default=False),
    task: str = typer.Option(None, "--task", help="The task for all: selective_copy, recall, parity, noisy_copy (default: the "
                             "recipes'), or lm: language modelling on the main job's corpus in bits per byte.", show_default=False),
    steps: int = typer.Option(None, "--steps", help="Equal steps: every model trains this many (default: the recipes' own).",
                              show_default=False),
    budget_seconds: float = typer.Option(None, "--budget-seconds", help="Equal wall time instead: a probe run measures each model's "
                                         "seconds per step; steps = budget / that (--task lm: 60 unless given).", show_default=False),
    seeds: int = typer.Option(3, "--seeds", help="Training seeds per model (models alternate their order seed by seed)."),
    tune_lr: str = typer.Option(None, "--tune-lr", help="Models to train at each learning rate of --lrs on seed 0, keeping the one "
                                "with the best validation score (e.g. lstm).", show_default=False),
    lrs: str = typer.Option(None, "--lrs", help="The learning-rate grid of --tune-lr (default: 1e-3,3e-3,1e-2,3e-2).", show_default=False),
    set_: list[str] = set_option("task.KEY=VALUE (not with --task lm) or train.KEY=VALUE for every model, "
                                 "MODEL:KEY=VALUE for one model's recipe, e.g. --set task.length=32 --set mamba:model.d_state=8 "
                                 "(repeatable)."),
    out: Path = typer.Option(Path("runs/bench-sequence"), "--out", "-o", help="Folder of the runs (OUT/<model>/seed-<k>)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier benchmark in --out (and the --plot file)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object (nothing else on stdout)."),
    plot: Path = plot_option(),
) -> None:
    """Sequence models at an equal budget: [bold]adl bench-sequence --models lstm,mamba,gpt --seeds 3 --tune-lr lstm[/]
    (--set task.KEY=VALUE or train.KEY=VALUE for every model: --set task.length=32; --set MODEL:KEY=VALUE for one:
    --set mamba:model.d_state=8)"""
    import json

    from rich.table import Table

    from adl_cli.cli.common import new_output
    from adl_cli.console import console
    from adl_cli.errors import pick
    from adl_cli.methods.bench_sequence import parse_models, run_bench_sequence

    names = parse_models(models)
    tuned = pick("tune_lr", tune_lr, names, "model") if tune_lr else []
    plot = new_output(plot, force, "PNG", ".png")
    log = (lambda *a, **k: None) if as_json else console.print
    report = run_bench_sequence(names, out, task=task, steps=steps, budget_seconds=budget_seconds, seeds=seeds, tune_lr=tuned, lrs=lrs,
                                settings=set_, force=force, log=log)
    if plot is not None:
        from adl_cli.engine.sequence_plots import bench_sequence_figure

        bench_sequence_figure(report, plot)
    if as_json:
        print(json.dumps(report))
        return
    lm = report["task"] == "lm"
    lengths = report["lengths"]
    budget = report["budget"]
    equal_steps = not budget["budget_seconds"] and len({r["steps"] for r in report["rows"]}) == 1
    spent = (f"{report['rows'][0]['steps']} steps each" if equal_steps else f"{budget['budget_seconds']:g} s of training each"
             if budget["budget_seconds"] else "each recipe's own steps")
    t = Table("model", "params", *([] if equal_steps else ["steps"]), "train tok/s", "dec tok/s",
              title=f"{report['task']}: {spent}, median of {report['seeds']} seed(s)", title_justify="left")
    if lm:
        t.add_column("val bpb")
    else:
        for n in lengths:
            t.add_column(f"acc@{n}")
    t.add_column(f"KiB@{lengths[-1]}")
    for r in report["rows"]:
        cells = [r["model"], f"{r['parameters'] / 1e3:,.0f}k", *([] if equal_steps else [str(r["steps"])]), f"{r['tokens_per_s']:,.0f}",
                 f"{r['decode_tokens_per_s']:,.0f}"]
        if lm:
            cells.append(f"{r['scores']['0']:.3f}")
        else:
            cells += ["-" if r["scores"].get(str(n)) is None else f"{r['scores'][str(n)]:.1%}" for n in lengths]
        state = r["state_bytes"]
        cells.append(f"{state[max(state, key=int)] / 1024:,.1f}")
        t.add_row(*cells)
    console.print(t)
    for r in report["rows"]:
        if r["lr_trials"]:
            console.print(f"{r['model']}: validation by learning rate " + ", ".join(f"{lr}: {v:.4g}" for lr, v in r["lr_trials"].items()),
                          highlight=False)
    lr_note = "" if any(r["lr_trials"] for r in report["rows"]) else "; learning rates: " + ", ".join(f"{r['model']} {r['lr']:g}" for r in report["rows"])
    if lm:
        console.print(f"[dim]val bpb: validation bits per byte; dec: greedy decoding at batch 1; KiB: the decode state of one sequence of "
                      f"{lengths[-1]} tokens{lr_note}; runs in {out}[/]", highlight=False)
    else:
        console.print(f"[dim]acc@N: accuracy on the answers at task length N (trained at {lengths[0]}; '-': past a model's context); dec: "
                      f"greedy decoding at batch 1; KiB: the decode state of one sequence at the longest length (a GPT's cache grows "
                      f"with it){lr_note}; runs in {out}[/]", highlight=False)
    if plot is not None:
        console.print(f"figure: {plot}")


def register(app: typer.Typer) -> None:
    app.command("bench-sequence", rich_help_panel="Benchmark")(bench_sequence)
