"""adl report: re-render a run's summary table, loss curve and sample from disk."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    run_dir: Path = typer.Argument(..., help="A run folder.", show_default=False),
    plot: Path = typer.Option(None, "--plot", help="Where to draw the loss and learning-rate figure (default: RUN/loss.png, redrawn from metrics.jsonl).", metavar="PATH.png"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --plot file (RUN/loss.png is always redrawn)."),
) -> None:
    """Show a finished run's report and draw its loss curve as a PNG: [bold]adl report runs/tiny[/]"""
    from adl_cli.cli.common import new_output
    from adl_cli.console import console
    from adl_cli.engine.plots import loss_figure
    from adl_cli.engine.report import read_metrics, read_summary, render_run
    from adl_cli.errors import AdlError

    if not run_dir.is_dir():
        raise AdlError(f"run folder not found: {run_dir}")
    target = new_output(plot, force, suffix=".png") if plot is not None else run_dir / "loss.png"
    summary = read_summary(run_dir)
    if summary.get("kind") == "sft":  # a fine-tuning run: its exact-match table and loss curve
        from adl_cli.cli.sft import print_summary
        from adl_cli.engine.report import loss_curve

        console.print(f"[bold]adl SFT run: {run_dir}[/] (from {summary.get('init')})", highlight=False)
        print_summary(summary)
        console.print("[bold]loss curve[/]")
        console.print(loss_curve(read_metrics(run_dir / "metrics.jsonl")), highlight=False, markup=False)
    elif summary.get("kind") in ("finetune", "reward", "dpo", "grpo", "ppo") and (run_dir / "report.md").exists():  # adl lora, adl rlhf: their report
        from rich.markdown import Markdown

        from adl_cli.engine.report import loss_curve

        console.print(Markdown((run_dir / "report.md").read_text(encoding="utf-8")))
        console.print("[bold]loss curve[/]")
        console.print(loss_curve(read_metrics(run_dir / "metrics.jsonl")), highlight=False, markup=False)
    else:
        render_run(run_dir, summary)
    loss_figure(read_metrics(run_dir / "metrics.jsonl"), target, title=f"adl run {run_dir.name}")
    console.print(f"[dim]figure: {target}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report", rich_help_panel="Use")(report)
