"""adl report: re-render a run's summary table, loss curve and sample from disk."""

from __future__ import annotations

from pathlib import Path

import typer


def report(run_dir: Path = typer.Argument(..., help="A run folder.", show_default=False)) -> None:
    """Show a finished run's report: [bold]adl report runs/tiny[/]"""
    from adl_cli.engine.report import render_run
    from adl_cli.errors import AdlError

    if not run_dir.is_dir():
        raise AdlError(f"run folder not found: {run_dir}")
    render_run(run_dir)


def register(app: typer.Typer) -> None:
    app.command("report", rich_help_panel="Use")(report)
