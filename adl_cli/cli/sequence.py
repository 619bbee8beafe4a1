"""adl sequence: a language-model family (GPT, Mamba, Mamba-2, xLSTM, RNN/GRU/LSTM, Perceiver AR) trained on a synthetic
sequence task, scored on the answers at the training length and longer ones, or on language modelling (task lm)."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import set_option


def sequence(
    recipe: str = typer.Argument(..., help="Sequence recipe TOML or a shipped one's name (recipes/sequence/: rnn, gru, lstm, "
                                 "slstm, mlstm, mamba, mamba2, gpt, on selective copying).", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object (nothing else on stdout)."),
) -> None:
    """Train a sequence model on a task: [bold]adl sequence mamba[/], [bold]adl sequence lstm --set task.name=parity[/]
    (tasks: selective_copy, recall, parity, noisy_copy; lm: language modelling on the main job's corpus at task.length tokens,
    an adl pretrain run scored in bits per byte)"""
    from rich.table import Table

    from adl_cli.cli.common import run_recipe_command
    from adl_cli.console import console
    from adl_cli.methods.sequence import load_sequence_recipe, run_sequence

    s, out = run_recipe_command("sequence", recipe, set_, out, load_sequence_recipe, run_sequence, resume=resume, force=force,
                                progress=progress, as_json=as_json)
    if s is None:
        return
    if s["task"] == "lm":
        console.print(f"{s['family']} on the main job's corpus ({s['parameters']:,} parameters, context {s['length']}): "
                      f"validation {s['scores'][0]['bits_per_byte']:.4f} bits per byte", highlight=False)
        console.print(f"{s['steps']} steps, {s['tokens_seen']:,} tokens in {s['train_wall_s']:.0f} s", highlight=False)
        console.print(f"[dim]run folder: {out} (an adl pretrain run: report.md, summary.json, model.safetensors)[/]", highlight=False)
        return
    t = Table("length", "answer accuracy", "examples all right", "loss", title=f"{s['family']} on {s['task']} ({s['parameters']:,} "
              f"parameters, trained at length {s['length']})", title_justify="left")
    for r in s["scores"]:
        if "skipped" in r:
            t.add_row(str(r["length"]), "-", "-", r["skipped"])
        else:
            t.add_row(str(r["length"]), f"{r['accuracy']:.2%}", f"{r['exact']:.2%}", f"{r['loss']:.4f}")
    console.print(t)
    console.print(f"{s['steps']} steps, {s['tokens_seen']:,} tokens in {s['train_wall_s']:.0f} s", highlight=False)
    console.print(f"[dim]run folder: {out} (report.md, summary.json, model.safetensors)[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("sequence", rich_help_panel="Labs")(sequence)
