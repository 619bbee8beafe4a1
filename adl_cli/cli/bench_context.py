"""adl bench-context: perplexity by evaluation length for a run trained at a shorter context."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import new_output, plot_option


def _cell(row, plain: bool) -> str:
    if row.ppl == float("inf"):
        return "inf"
    text = f"{row.ppl:,.2f}"
    return text if plain else f"{text} [dim](x{row.ratio:.2f})[/]"


def render(report, console) -> None:
    from rich.table import Table

    trained = report.trained_length
    table = Table(
        title=f"perplexity by evaluation length ({report.run_dir}, trained at {trained} tokens, position={report.run_position})",
        caption=(
            f"cells: perplexity (x ratio to the run's own {report.reference_ppl:.2f} at {trained} tokens); "
            f"the same {report.windows * max(report.lengths):,} validation tokens at every length"
        ),
    )
    table.add_column("position", style="bold")
    table.add_column("scale s")
    for length in report.lengths:
        table.add_column(f"{length} ({length / trained:g}x)", justify="right")
    for mode in ("zero-shot", "finetuned"):
        for name in report.positions:
            rows = [r for r in report.rows if r.position == name and r.mode == mode]
            if not rows:
                continue
            label = name if mode == "zero-shot" else f"{name} +ft {report.finetune[name]['steps']}"
            scales = sorted({r.scale for r in rows if r.scale is not None})
            if not scales:
                s = "-"
            elif len(scales) == 1:
                s = f"{scales[0]:g}"
            else:
                s = "length / " + str(trained)
            table.add_row(label, s, *(_cell(r, False) for r in rows))
    console.print(table)
    if report.passkey_trials:
        keys = Table(title=f"passkey retrieval ({report.passkey_trials} trials per cell: a 5-digit key at a random depth of held-out text)")
        keys.add_column("position", style="bold")
        for length in report.lengths:
            keys.add_column(f"{length}", justify="right")
        for mode in ("zero-shot", "finetuned"):
            for name in report.positions:
                rows = [r for r in report.rows if r.position == name and r.mode == mode]
                if rows:
                    label = name if mode == "zero-shot" else f"{name} +ft {report.finetune[name]['steps']}"
                    keys.add_row(label, *("-" if r.passkey is None else f"{r.passkey:.0%}" for r in rows))
        console.print(keys)

    cache = Table(title=f"KV cache at this shape ({report.kv_cache[0]['dtype_bytes'] * 8}-bit values)")
    cache.add_column("attention", style="bold")
    cache.add_column("cached per layer and token")
    cache.add_column("bytes / token", justify="right")
    length = report.kv_cache[0]["length"]
    cache.add_column(f"one sequence of {length}", justify="right")
    mha = report.kv_cache[0]["bytes_per_token"]
    for row in report.kv_cache:
        ratio = f" (x{row['bytes_per_token'] / mha:.2f})" if row is not report.kv_cache[0] else ""
        cache.add_row(row["attention"], row["shape"], f"{row['bytes_per_token']:,}{ratio}", _size(row["bytes_at_length"]))
    console.print(cache)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def bench_context(
    run_dir: Path = typer.Argument(..., help="A run folder written by adl pretrain (trained with rope or alibi), or a LongLoRA run of adl lora (read as it was fine-tuned).", show_default=False),
    lengths: str = typer.Option("256,512,1024,2048", "--lengths", "-l", help="Evaluation lengths in tokens, comma-separated."),
    position: str = typer.Option(
        None, "--position", help="Variants to compare, comma-separated: rope, pi, ntk, yarn (a rope run), or the run's own (alibi). Default: all a run allows."
    ),
    scale: float = typer.Option(None, "--scale", help="Fixed scale s for pi/ntk/yarn (default: length / trained length per column)."),
    finetune_steps: int = typer.Option(0, "--finetune-steps", help="Also fine-tune each variant this many steps at the longest length."),
    finetune_lr: float = typer.Option(None, "--finetune-lr", help="Fine-tune learning rate (default: the run's train.lr / 10)."),
    batches: int = typer.Option(None, "--batches", "-b", help="Windows of the longest length to score (the same tokens at every length; default: as many as fit, up to 16 or 8,192 tokens)."),
    out: Path = typer.Option(None, "--out", "-o", help="Where fine-tunes go (default: RUN_DIR/context-<position>/)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the rows (and the KV-cache sizes) as JSON here (an existing file needs --force)."),
    plot: Path = plot_option(),
    force: bool = typer.Option(False, "--force", help="Replace existing --json / --plot files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the fine-tune progress bar."),
    passkey: int = typer.Option(0, "--passkey", help="Also hide a 5-digit pass key in this many held-out texts of each length and count the retrieved ones."),
) -> None:
    """Perplexity by length, RoPE vs PI/NTK/YaRN: [bold]adl bench-context runs/tiny-rope --lengths 128,256,512 --position rope,pi,ntk,yarn[/]"""
    from adl_cli.console import console
    from adl_cli.bench.context import bench_context as run, write_json

    json_path, plot = new_output(json_path, force), new_output(plot, force, suffix=".png")
    console.print(f"[bold]adl bench-context[/] {run_dir}")
    report = run(
        run_dir,
        lengths,
        position,
        scale=scale,
        finetune_steps=finetune_steps,
        finetune_lr=finetune_lr,
        batches=batches,
        out_dir=out,
        progress=progress,
        passkey=passkey,
        log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False),
    )
    render(report, console)
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"[dim]rows written to {json_path}[/]")
    if plot is not None:
        from adl_cli.bench.context import plot_report

        plot_report(report, plot)
        console.print(f"[dim]figure: {plot}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("bench-context", rich_help_panel="Benchmark")(bench_context)
