"""adl eval: perplexity and bits per byte of a run on its held-out split or on any text."""

from __future__ import annotations

from pathlib import Path

import typer


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder (adl pretrain, adl import).", show_default=False),
    data: str = typer.Option(None, "--data", help="Text to score: a built-in corpus (pydoc, stdlib, stdlib-tests), a file, folder or glob; every document of it. Left out: the run's own split (--split).", show_default=False),
    split: str = typer.Option("val", "--split", help="Without --data: val (the run's held-out split, as training measured it) or train (the corpus's own training side)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows of the model's context scored together."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text (a quick look).", show_default=False),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 autocast (as training evaluates on a bf16 host)."),
    quant: str = typer.Option(None, "--quant", help="Score with weight-only int8 or int4 weights (what quantization costs in bits per byte).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    """Loss, perplexity and bits per byte on a text: [bold]adl eval runs/tiny[/] (its held-out split)"""
    import json

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.errors import AdlError
    from adl_cli.methods.evaluate import evaluate_tokens, evaluation_tokens
    from adl_cli.methods.generate import load_decoding_run

    if max_tokens is not None and max_tokens < 2:
        raise AdlError(f"--max-tokens must be >= 2, got {max_tokens}")
    run = load_decoding_run(run_dir, quant=quant, command="eval")
    tokens, what = evaluation_tokens(run, data, split)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    result = evaluate_tokens(run.model, run.tokenizer, tokens, batch_size=batch_size, precision=precision, text=what)
    if as_json:
        print(json.dumps({"run": str(run_dir), "quant": quant, **result.to_dict()}))
        return
    table = Table(title=f"adl eval {run_dir}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("text", what), ("tokens scored", f"{result.tokens:,}"), ("loss (nats/token)", f"{result.loss:.4f}"),
            ("perplexity", f"{result.perplexity:.2f}"), ("bits per byte", f"{result.bits_per_byte:.4f}"),
            ("bytes per token", f"{result.bytes_per_token:.3f}"), ("context x batch", f"{result.context} x {result.batch_size}"),
            ("precision", result.precision + (f", {quant} weights" if quant else "")),
            ("time", f"{result.seconds:.2f} s ({result.tokens_per_s:,.0f} tokens/s)")]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", rich_help_panel="Use")(evaluate)
