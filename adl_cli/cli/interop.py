"""adl import / adl export: GPT-2 weights to and from transformers' layout."""

from __future__ import annotations

from pathlib import Path

import typer

import_app = typer.Typer(help="Bring models from other tools into adl run folders.", no_args_is_help=True)
export_app = typer.Typer(help="Write adl models in other tools' formats.", no_args_is_help=True)


def _show(result, verb: str) -> None:
    from adl_cli.console import console, console_err

    c = result.config
    console.print(
        f"{verb} {result.out}: GPT-2 {c.n_layer}L/{c.n_head}H/{c.n_embd}, context {c.block_size}, vocab {c.vocab_size}, "
        f"{result.parameters / 1e6:.2f}M parameters; tokenizer {result.tokenizer}",
        highlight=False,
    )
    for note in result.notes:
        console_err.print(f"[yellow]note:[/] {note}", highlight=False)


@import_app.command("hf-gpt2")
def import_hf_gpt2(
    src: Path = typer.Argument(..., help="A transformers GPT-2 folder (config.json + model.safetensors).", show_default=False, metavar="DIR"),
    out: Path = typer.Option(..., "--out", "-o", help="The adl run folder to write."),
    tokenizer: str = typer.Option(
        None,
        "--tokenizer",
        help="bytes | gpt2 | a .tiktoken file | a run folder. Default: DIR/adl_tokenizer, else vocab.json + merges.txt, else gpt2.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace what --out already holds."),
) -> None:
    """Import a transformers GPT2LMHeadModel: [bold]adl import hf-gpt2 path/to/gpt2 --out runs/gpt2[/]"""
    from adl_cli.methods.interop import import_hf_gpt2 as run

    _show(run(src, out, tokenizer=tokenizer, force=force), "wrote")


@export_app.command("hf")
def export_hf(
    run_dir: Path = typer.Argument(..., help="An adl run folder (adl pretrain or adl import).", show_default=False, metavar="RUN_DIR"),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (GPT2LMHeadModel.from_pretrained reads it)."),
    force: bool = typer.Option(False, "--force", help="Replace what --out already holds."),
) -> None:
    """Export a run as transformers GPT-2: [bold]adl export hf runs/tiny --out hf/tiny[/]"""
    from adl_cli.methods.interop import export_hf as run

    _show(run(run_dir, out, force=force), "wrote")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import", rich_help_panel="Interop")
    app.add_typer(export_app, name="export", rich_help_panel="Interop")
