"""adl quantize (a float run -> a quantized run folder) and adl bench-quantize (every method, one table)."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import plot_option

METHOD_HELP = ("int8 (absmax, a scale a row), int4 (zero-point, groups of 128), nf4 / fp4 (bitsandbytes, blocks of 64), nf4-adl (adl's own "
               "NF4), llm-int8 (bitsandbytes LLM.int8()), gptq, awq, smoothquant (W8A8), w8a8 (no smoothing), hqq (groups of 64).")


def quantize(
    run_dir: Path = typer.Argument(..., help="A float run folder (adl pretrain, adl sft, adl import, a merged adapter run).", show_default=False),
    method: str = typer.Option(..., "--method", help=METHOD_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", help="The quantized run folder to write (an existing, non-empty one needs --force).", show_default=False),
    group_size: int = typer.Option(None, "--group-size", help="Inputs sharing a scale (0: the whole row). Default: the method's (see --method).", show_default=False),
    bits: int = typer.Option(None, "--bits", help="gptq, awq, hqq: 4 (default) or 8.", show_default=False),
    grid: str = typer.Option(None, "--grid", help="int8, int4: absmax (symmetric) or zero-point. Default: absmax for int8, zero-point for int4.", show_default=False),
    act_order: bool = typer.Option(False, "--act-order", help="gptq: round the most used inputs first (largest Hessian diagonal)."),
    damp: float = typer.Option(0.01, "--damp", help="gptq: dampening added to the Hessian, times its mean diagonal."),
    alpha: float = typer.Option(0.5, "--alpha", help="smoothquant: migration strength in [0, 1] (0: all on the activations)."),
    threshold: float = typer.Option(6.0, "--threshold", help="llm-int8: activations this large make their input column an outlier (kept in floating point)."),
    double_quant: bool = typer.Option(False, "--double-quant", help="nf4, fp4: quantize the block scales too (8 bits)."),
    head: bool = typer.Option(False, "--head", help="Quantize the output head too (a tied head gets its own quantized copy; the file grows)."),
    float_dtype: str = typer.Option("fp32", "--float-dtype", help="Store what stays float (embeddings, norms, an unquantized head) as fp32, bf16 or fp16 (rounded alike in memory; loads back as fp32)."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="gptq, awq, smoothquant: calibration windows (of the context, at most 512 tokens)."),
    calib_data: str = typer.Option(None, "--calib-data", help="gptq, awq, smoothquant: calibration text (corpus name, file, folder, glob). Default: the run's training split.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Which calibration windows are drawn."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder (once the new one is complete)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Quantize a run's linear layers and write a run folder that adl generate, eval, chat and
    bench-inference read: [bold]adl quantize runs/tiny --method gptq --out runs/tiny-gptq[/]"""
    import json
    from dataclasses import asdict

    from adl_cli.console import console, console_err
    from adl_cli.methods.quantize import quantize_run
    from adl_cli.quantization.methods import QuantOptions

    opts = QuantOptions(group_size=group_size, bits=bits, grid=grid, act_order=act_order, damp=damp, alpha=alpha, threshold=threshold,
                        double_quant=double_quant, head=head, calib_samples=calib_samples, seed=seed)
    result = quantize_run(run_dir, out, method, opts, calib_data=calib_data, force=force, float_dtype=float_dtype,
                          log=lambda msg: None if as_json else console_err.print(f"[dim]{msg}[/]"))
    if as_json:
        print(json.dumps({**asdict(result), "out": str(result.out)}))
        return
    grouping = f"groups of {result.group_size}" if result.group_size else "a scale a row"
    console.print(f"{method} ({grouping}): {result.layers} linear layers quantized in {result.seconds:.1f} s -> {result.out}")
    console.print(f"  {result.bits_per_parameter:.2f} bits per parameter; model.safetensors {result.out_bytes / 1e6:.2f} MB "
                  f"(source {result.source_bytes / 1e6:.2f} MB, {result.source_bytes / max(1, result.out_bytes):.2f}x smaller)")
    console.print(f"  calibration: {result.calibration}")
    console.print(f"  next: adl eval {result.out}   adl generate {result.out} --prompt ...   adl bench-quantize {run_dir}")


def bench_quantize(
    run_dir: Path = typer.Argument(..., help="A float run folder.", show_default=False),
    method: list[str] = typer.Option(None, "--method", help="Contenders (repeatable); fp32 always runs. Default: every method, and torchao's "
                                     "torchao-int8, torchao-int4, torchao-w8a8 where torchao is installed.", show_default=False),
    data: str = typer.Option(None, "--data", help="Text to score (corpus name, file, folder, glob). Default: the run's held-out split.", show_default=False),
    calib_data: str = typer.Option(None, "--calib-data", help="Calibration text of gptq, awq, smoothquant. Default: the run's training split.", show_default=False),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Score the first N tokens of the text (0: all of it)."),
    task: str = typer.Option(None, "--task", help="Also exact match of greedy answers on a built-in task's held-out problems.", show_default=False),
    examples: int = typer.Option(200, "--examples", help="With --task: held-out problems."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens decoded per timing (batch 1, greedy)."),
    rounds: int = typer.Option(3, "--rounds", help="Timing rounds (contenders alternated; the median is kept)."),
    group_size: int = typer.Option(None, "--group-size", help="Group size of the grouped methods (int4, nf4, fp4, nf4-adl, gptq, awq, hqq). Default: each method's.", show_default=False),
    head: bool = typer.Option(False, "--head", help="adl's methods quantize the output head too (torchao's always do)."),
    outliers: int = typer.Option(0, "--outliers", help="First inject N function-preserving outlier channels after every norm (LLM.int8(), SmoothQuant and AWQ's case)."),
    outlier_scale: float = typer.Option(30.0, "--outlier-scale", help="With --outliers: how much larger those channels get."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows of the calibrated methods."),
    seed: int = typer.Option(0, "--seed", help="Calibration windows and outlier channels drawn."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (bitsandbytes' CUDA kernels; adl's grids dequantize there)."),
    plot: Path = plot_option(),
    force: bool = typer.Option(False, "--force", help="Replace the --plot file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Every quantization method on one run: size, perplexity, KL to fp32, decode speed:
    [bold]adl bench-quantize runs/tiny --plot quant.png[/]"""
    import json

    from rich.table import Table

    from adl_cli.cli.common import check_device, new_output
    from adl_cli.console import console, console_err
    from adl_cli.errors import AdlError
    from adl_cli.methods.bench_quantize import DEFAULT, bench_quantize as run_bench

    if outliers < 0 or outlier_scale <= 1:
        raise AdlError(f"--outliers must be >= 0 and --outlier-scale > 1, got {outliers} and {outlier_scale}")
    check_device(device)
    plot = new_output(plot, force, "PNG", ".png")
    report = run_bench(run_dir, list(method or DEFAULT), data=data, calib_data=calib_data, max_tokens=max_tokens or None, task=task, examples=examples,
                       new_tokens=new_tokens, rounds=rounds, group_size=group_size, head=head, outliers=outliers, outlier_scale=outlier_scale, calib_samples=calib_samples,
                       seed=seed, device=device, log=lambda msg: None if as_json else console_err.print(f"[dim]{msg}[/]"))
    if plot is not None:
        from adl_cli.engine.plots import quantization_figure

        quantization_figure(plot, report)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    title = f"adl bench-quantize {run_dir}: {report.tokens:,} tokens of {report.text}"
    table = Table("method", "bits/p", "MB", "ppl", "bpb", "KL", *(["exact"] if report.task else []), "tok/s", "time",
                  title=title, title_justify="left")
    base = report.rows[0]
    for r in report.rows:
        exact = [f"{r.exact:.1%}"] if report.task else []
        table.add_row(r.name, f"{r.bits_per_parameter:.2f}", f"{r.file_mb:.2f}", f"{r.perplexity:.2f}", f"{r.bits_per_byte:.3f}",
                      "0" if r is base else f"{r.kl:.1e}", *exact, f"{r.decode_tok_s:.0f}", "-" if r is base else f"{r.quantize_s:.1f}s")
    console.print(table)
    console.print("bits/p: stored bits per parameter; KL: KL(fp32 || method) nats/token; tok/s: greedy decode at batch 1; time: "
                  "to quantize. nf4, fp4, llm-int8 run through bitsandbytes, torchao-* through torchao, the rest is adl's.")
    console.print(f"ppl relative to fp32: " + ", ".join(f"{r.name} {r.perplexity / base.perplexity - 1:+.2%}" for r in report.rows[1:]))
    if report.outliers:
        o = report.outliers
        console.print(f"outliers: {o['channels']} channels x{o['scale']:g} after {o['norms']} norms (largest logit change {o['max_logit_change']:.1e})")
    for name, why in report.skipped.items():
        console.print(f"[dim]{name} skipped: {why}[/]")
    console.print(f"calibration: {report.calibration}; decode: batch 1, {report.decode['new_tokens']} new tokens, "
                  f"median of {report.decode['rounds']} alternated rounds, {report.decode['threads']} threads")
    if plot is not None:
        console.print(f"figure: {plot}")


def register(app: typer.Typer) -> None:
    app.command("quantize", rich_help_panel="Compress")(quantize)
    app.command("bench-quantize", rich_help_panel="Benchmark")(bench_quantize)
