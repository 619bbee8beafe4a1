"""adl sft: supervised fine-tuning of a run through a chat template; `adl sft tasks` lists the built-in tasks."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import default_out, resolve_recipe, set_option


def sft(
    recipe: str = typer.Argument(..., help="Recipe TOML (recipes/sft/addition.toml), a shipped SFT recipe's name (addition, tiny), or "
                                 "'tasks' to list the built-in tasks with an example each.", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings."),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure the starting run's exact match (asked in plain text), for the side-by-side table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
) -> None:
    """Fine-tune a run on chat examples: [bold]adl sft addition[/] (starts from runs/tiny), [bold]adl sft tasks[/]"""
    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.sft import load_sft_recipe, run_sft

    if recipe == "tasks":
        print_tasks()
        return
    path = resolve_recipe(Path(recipe), command="sft")
    rec = load_sft_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl sft[/] {path} -> {out}", highlight=False)
    outcome = run_sft(rec, out, resume=resume, force=force, progress=progress, log=console.print, evaluate_base=base)
    if outcome.main and outcome.summary:
        from adl_cli.engine.plots import loss_figure
        from adl_cli.engine.report import read_metrics

        print_summary(outcome.summary)
        loss_figure(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"adl sft {out.name}")
        console.print(f"[dim]run folder: {out} (report.md, loss.png, summary.json, metrics.jsonl, model.safetensors, tokenizer.json with the chat template); "
                      f"talk to it: adl chat {out}[/]", highlight=False)


def print_tasks() -> None:
    import random

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.data.tasks import TASKS, make_task

    t = Table("task", "example question", "reference answer", title="built-in SFT tasks (data.tasks)", title_justify="left")
    for name in TASKS.names():
        p = make_task(name).draw(random.Random(0))
        t.add_row(name, p.question, p.answer)
    console.print(t)
    console.print("[dim]with data.scratchpad = true, addition and multiplication answers show their steps first:[/]")
    p = make_task("addition", scratchpad=True).draw(random.Random(0))
    console.print(f"  {p.question} -> {p.answer}", highlight=False, markup=False)


def print_summary(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from adl_cli.console import console

    t = Table("task", "n", "base", "SFT (95% CI)", "stops", title="exact match on held-out problems", title_justify="left")
    for name, r in summary["tasks"].items():
        s, b = r["sft"], r["base"]
        t.add_row(name, str(s["n"]), "-" if b is None else f"{b['accuracy']:.1%}",
                  f"{s['accuracy']:.1%} ({s['ci95'][0]:.1%}-{s['ci95'][1]:.1%})", f"{s['stopped'] / max(1, s['n']):.0%}")
    console.print(t)
    val = summary.get("val_loss")
    console.print(f"{summary['steps']} steps, {summary['trained_tokens']:,} trained tokens ({summary['tokens_seen']:,} read) in "
                  f"{summary['train_wall_s']:.0f} s; held-out loss {'-' if val is None else f'{val:.3f}'}", highlight=False)
    for name, r in summary["tasks"].items():
        for smp in r["sft"]["samples"][:2]:
            mark = "[green]right[/]" if smp["correct"] else "[red]wrong[/]"
            console.print(f"  {name}: {escape(smp['question'])} -> {escape(smp['answer'])} ({mark})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("sft", rich_help_panel="Train")(sft)
