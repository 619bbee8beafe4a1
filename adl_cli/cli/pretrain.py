"""adl pretrain: train a GPT from a recipe, show progress, print a report and a sample."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import default_out, resolve_recipe, set_option


def pretrain(
    recipe: Path = typer.Argument(..., help="Recipe TOML (e.g. recipes/pretrain/tiny.toml), a run's recipe.toml, or a shipped recipe's name (tiny).", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint (only train.steps and the log/eval/checkpoint cadence may change)."),
    resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder (runs/X/checkpoints/step-N); implies --resume.", metavar="CHECKPOINT"),
    force: bool = typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
) -> None:
    """Pretrain a GPT on a corpus: [bold]adl pretrain recipes/pretrain/tiny.toml --set train.steps=200[/]"""
    from adl_cli.engine.checkpoint import atomic_write_text
    from adl_cli.console import console
    from adl_cli.engine.plots import loss_figure
    from adl_cli.engine.report import read_metrics, render_run
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain

    from adl_cli.engine.distributed import is_main_env

    recipe = resolve_recipe(recipe)
    rec = load_pretrain_recipe(recipe, set_)
    out = out or default_out(recipe, rec.name)
    if is_main_env():  # under torchrun / accelerate launch only rank 0 prints
        console.print(f"[bold]adl pretrain[/] {recipe} -> {out}", highlight=False)
    outcome = run_pretrain(rec, out, resume=resume, resume_from=resume_from, force=force, progress=progress, log=console.print)
    if outcome.main and outcome.summary and outcome.sample is not None and (out / "summary.json").exists():
        md = render_run(out, outcome.summary)
        atomic_write_text(out / "report.md", md)
        loss_figure(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"adl run {out.name}")
        console.print(f"[dim]run folder: {out} (report.md, loss.png, metrics.jsonl, model.safetensors, checkpoints/)[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("pretrain", rich_help_panel="Train")(pretrain)
