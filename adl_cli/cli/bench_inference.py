"""adl bench-inference: decoding speed of a run, adl's ways side by side with transformers' generate."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import check_device, new_output, plot_option


def bench_inference(
    run_dir: Path = typer.Argument(..., help="A run folder (adl pretrain, adl import).", show_default=False),
    batch: str = typer.Option("1,4,16", "--batch", help="Batch sizes, comma-separated (no-cache, int4, speculative, lookup and torchao-int8 run at batch 1 only)."),
    prompt_len: int = typer.Option(32, "--prompt-len", help="Prompt tokens (windows of the run's held-out text)."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated per row, greedy, no early stop (capped so that prompt + new fit the context)."),
    only: str = typer.Option(None, "--only", help="Contenders to run, comma-separated: no-cache, cache, compiled, int8, int4, speculative, lookup, transformers, torchao-int8 (default: all; torchao's where it is installed).", show_default=False),
    draft: Path = typer.Option(None, "--draft", help="A draft run (same tokenizer) for the speculative row.", show_default=False),
    lookup: int = typer.Option(3, "--lookup", help="Longest n-gram prompt lookup matches."),
    lookahead: int = typer.Option(4, "--lookahead", help="Tokens drafted per verification pass (speculative and lookup rows)."),
    rounds: int = typer.Option(3, "--rounds", help="Timed rounds per contender, in alternating order; medians are reported."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures to this JSON file.", show_default=False),
    plot: Path = plot_option(),
    force: bool = typer.Option(False, "--force", help="Replace existing --json / --plot files."),
) -> None:
    """Prefill and decode speed, memory and the memory-read bound: [bold]adl bench-inference runs/tiny --batch 1,16[/]"""
    import json

    from adl_cli.bench.inference import bench_inference as run_bench
    from adl_cli.bench.inference import parse_batches, parse_contenders
    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError

    batches = parse_batches(batch)
    names = parse_contenders(only)
    check_device(device)
    json_path, plot_path = new_output(json_out, force), new_output(plot, force, suffix=".png")
    report = run_bench(run_dir, batches=batches, prompt_len=prompt_len, new_tokens=new_tokens, rounds=rounds, only=names, draft_dir=draft,
                       lookup=lookup, lookahead=lookahead, device=device, log=lambda m: console_err.print(f"[dim]{m}[/]", highlight=False))
    render(report, console)
    if json_path is not None:
        from adl_cli.fileio import atomic_write

        atomic_write(json_path, json.dumps(report.to_dict(), indent=1))
        console.print(f"[dim]figures: {json_path}[/]", highlight=False)
    if plot_path is not None:
        from adl_cli.engine.plots import series_figure

        series = {}
        for r in report.rows:  # the peer drawn as the baseline
            label = "baseline: transformers generate" if r.contender == "transformers" else r.contender
            series.setdefault(label, []).append((r.batch, r.decode_tok_s))
        series_figure(plot_path, series, title=f"decode tokens/s by batch ({run_dir}, {report.device}, {report.threads} threads)",
                      xlabel="batch", ylabel="decode tokens / s", logx=True, logy=True)
        console.print(f"[dim]figure: {plot_path}[/]", highlight=False)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(report, console) -> None:
    from rich.table import Table

    table = Table(title=f"decoding {report.run}: {report.shape}; {report.device}, {report.threads} threads, {report.dtype}",
                  caption=f"{report.prompt_len}-token prompts, {report.new_tokens} new tokens, greedy; medians of {report.rounds} rounds",
                  title_justify="left", caption_justify="left")
    for name, just in (("contender", "left"), ("B", "right"), ("prefill", "right"), ("decode", "right"), ("ms/tok", "right"),
                       ("×peer", "right"), ("bound", "right"), ("MB", "right"), ("same", "right")):
        table.add_column(name, justify=just, no_wrap=True)
    for r in report.rows:
        table.add_row(r.contender, str(r.batch), _num(r.prefill_tok_s, ",.0f"), _num(r.decode_tok_s, ",.0f"), _num(r.ms_per_token, ".2f"),
                      _num(r.vs_peer, ".2f"), "-" if r.bound_share is None else f"{r.bound_share:.0%}", _num(r.memory_mb, ",.1f"),
                      "-" if r.same_tokens is None else f"{r.same_tokens:.0%}")
    console.print(table)
    lines = ["prefill, decode: tokens/s; ms/tok: per decoding step"]
    if report.peer_weights != "none":
        lines.append(f"×peer: decode speed over transformers' generate at the same batch, on {report.peer_weights}")
    lines += ["bound: share of the memory-read bound (bytes a step / read bandwidth on a buffer that size)",
              "MB: weights + decode state; same: greedy tokens equal to adl's cached decoding of the same weights"]
    if report.bandwidth_gb_s:
        gbs, mbs = list(report.bandwidth_gb_s.values()), [float(k) for k in report.bandwidth_gb_s]
        lines.append(f"read bandwidth measured: {min(gbs):.0f} to {max(gbs):.0f} GB/s on buffers of {min(mbs):g} to {max(mbs):g} MB")
    if report.compile_s is not None:
        lines.append(f"compiled: {report.compile_s:.1f} s to compile (not in the timings)")
    for note in lines + report.notes:
        console.print(f"[dim]{note}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("bench-inference", rich_help_panel="Benchmark")(bench_inference)
