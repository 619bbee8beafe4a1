"""adl bench-attention: time, peak memory and error of attention implementations by length."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from adl_cli.cli.common import new_output, plot_option


def _fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


def render(seq: int, rows: list[dict], console) -> None:
    from rich.table import Table

    first = rows[0]
    table = Table(
        title=(f"attention at T={seq} (B={first['batch']}, H={first['heads']}, D={first['head_dim']}, "
               f"{'causal' if first['causal'] else 'full'}, {first['dtype']}, {first['device']}, "
               f"{first['threads']} threads, median of {first['repeats']})"),
        caption="/sdpa: time over torch SDPA's (fwd+bwd when measured); /naive: peak memory over naive's; err: max |out - naive|",
    )
    for name in ("impl", "fwd ms", "fwd+bwd", "/sdpa", "peak MB", "/naive", "max err"):
        table.add_column(name, justify="left" if name == "impl" else "right", no_wrap=True,
                         style="bold" if name == "impl" else None)
    notes = []
    for r in rows:
        label = r["impl"] + (f" [dim]({r['backend']})[/]" if r.get("backend") else "")
        note = r.get("note") or ""
        if r.get("shard_mb") is not None:
            note += f"; resident shard + KV in flight {r['shard_mb']:,.1f} MB"
        if note:
            notes.append(f"[dim]{r['impl']}: {note}[/]")
        table.add_row(
            label, _fmt(r["fwd_ms"], ",.1f"), _fmt(r["fwdbwd_ms"], ",.1f"),
            "-" if r["ratio_sdpa"] is None else f"x{r['ratio_sdpa']:.2f}",
            _fmt(r["peak_mb"], ",.1f"), _fmt(r["mem_vs_naive"], ".3f"), _fmt(r["max_err"], ".0e"),
        )
    console.print(table)
    for line in notes:
        console.print(line, highlight=False)


def bench_attention(
    impl: str = typer.Option(None, "--impl", "-i", help="Implementations, comma-separated (default: naive,sdpa,flash,window,ring,tree and mla)."),
    seq: str = typer.Option("512,1024,2048", "--lengths", "-l", "--seq", help="Sequence lengths, comma-separated (--seq is the old name)."),
    heads: int = typer.Option(8, "--heads", help="Attention heads H."),
    head_dim: int = typer.Option(64, "--head-dim", help="Head dimension D."),
    batch: int = typer.Option(1, "--batch", help="Batch size B."),
    causal: bool = typer.Option(True, "--causal/--no-causal", help="Causal (decoder) or full attention."),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Also time forward + backward."),
    dtype: str = typer.Option("float32", "--dtype", help="fp32, bf16 or fp16 (as train.precision says; float32, bfloat16, float16 also work)."),
    repeats: int = typer.Option(3, "--repeats", "-r", help="Timed repeats per implementation (medians; implementations alternate)."),
    window: int = typer.Option(256, "--window", help="Window W of the sliding-window implementation."),
    threads: int = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the rows as JSON here (an existing file needs --force)."),
    plot: Path = plot_option(),
    force: bool = typer.Option(False, "--force", help="Replace existing --json / --plot files."),
) -> None:
    """Attention time, peak memory and error by length: [bold]adl bench-attention --impl naive,sdpa,flash --seq 512,1024,2048[/]"""
    import torch

    from adl_cli.bench.attention import default_impls, parse_dtype, parse_impls, parse_seqs, run_attention_bench
    from adl_cli.console import console
    from adl_cli.errors import AdlError

    json_path, plot = new_output(json_path, force), new_output(plot, force, suffix=".png")
    impls = parse_impls(impl) if impl else default_impls()
    seqs = parse_seqs(seq)
    from adl_cli.bench.attention import canonical_dtype

    dtype = canonical_dtype(dtype)
    if threads is not None:
        if threads < 1:
            raise AdlError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    console.print(f"[bold]adl bench-attention[/] impl={','.join(impls)} seq={','.join(map(str, seqs))}", highlight=False)
    rows = run_attention_bench(
        impls, seqs, batch=batch, heads=heads, head_dim=head_dim, causal=causal, backward=backward, dtype=dtype,
        repeats=repeats, window=window, on_seq=lambda T, seq_rows: render(T, seq_rows, console),
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        console.print(f"[dim]rows written to {json_path}[/]", highlight=False)
    if plot is not None:
        from adl_cli.bench.attention import plot_rows

        plot_rows(rows, plot)
        console.print(f"[dim]figure: {plot}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("bench-attention", rich_help_panel="Benchmark")(bench_attention)
