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
    task: list[str] = typer.Option(None, "--task", help="Instead of text: exact match of greedy answers on a built-in task's held-out problems (adl sft tasks lists them); repeatable.", show_default=False),
    examples: int = typer.Option(1000, "--examples", help="With --task: held-out problems per task."),
    samples: int = typer.Option(0, "--samples", help="With --task: also sample N answers per problem and report pass@k, majority vote (self-consistency) and best-of-k for k = 1, 2, 4 ... N."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --samples: the sampling temperature."),
    reward_model: Path = typer.Option(None, "--reward-model", help="With --samples: a reward run (adl rlhf reward) that picks the best of k answers.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="With --samples: the seed of the draws (one generator per problem and sample)."),
    plot: Path = typer.Option(None, "--plot", help="With --samples: draw accuracy against samples per problem into this PNG.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace the --plot file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    """Loss, perplexity and bits per byte on a text: [bold]adl eval runs/tiny[/] (its held-out split);
    exact match on tasks: [bold]adl eval runs/addition --task addition[/]; inference-time scaling:
    [bold]adl eval runs/sft-tiny --task count --samples 8 --plot scaling.png[/]"""
    import json

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.errors import AdlError
    from adl_cli.methods.evaluate import evaluate_tokens, evaluation_tokens
    from adl_cli.methods.generate import load_decoding_run

    from adl_cli.cli.common import new_output

    if max_tokens is not None and max_tokens < 2:
        raise AdlError(f"--max-tokens must be >= 2, got {max_tokens}")
    if samples < 0:
        raise AdlError(f"--samples must be >= 0, got {samples}")
    if not samples and (reward_model is not None or plot is not None):
        raise AdlError("--reward-model and --plot go with --samples N (answers sampled per problem)")
    if samples and not task:
        raise AdlError("--samples goes with --task: it samples answers to a task's problems")
    if not temperature > 0:
        raise AdlError(f"--temperature must be > 0 (answers are sampled), got {temperature}")
    plot = new_output(plot, force, "PNG", ".png")
    run = load_decoding_run(run_dir, quant=quant, command="eval")
    if task:
        if data is not None:
            raise AdlError("--task scores answers to problems and --data scores text: give one")
        if samples:
            from adl_cli.cli.eval_scaling import scaling_report

            return scaling_report(run, run_dir, task, examples, samples, temperature, reward_model, seed, plot, as_json)
        return _task_report(run, run_dir, task, examples, quant, as_json)
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


def _task_report(run, run_dir: Path, names: list[str], examples: int, quant, as_json: bool) -> None:
    """Exact match per task on held-out problems of the run's own split (an SFT run's data.seed,
    scratchpad and operand digits; 0, none and 3 for other runs)."""
    import json
    import time

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.data.tasks import TASKS, make_task, split_problems
    from adl_cli.errors import AdlError
    from adl_cli.methods.exact_match import exact_match
    from adl_cli.methods.sft import task_settings

    if examples < 1:
        raise AdlError(f"--examples must be >= 1, got {examples}")
    for name in names:
        TASKS.get(name)
    seed, options = task_settings(run_dir)
    rows = []
    for name in names:
        t = make_task(name, **options)
        problems = split_problems(t, examples, held_out=True, seed=seed)
        start = time.perf_counter()
        score = exact_match(run.model, run.tokenizer, t, problems, keep_samples=3)
        rows.append({**score.to_dict(), "seconds": round(time.perf_counter() - start, 2)})
    if as_json:
        print(json.dumps({"run": str(run_dir), "quant": quant, "split_seed": seed, **options, "tasks": rows}))
        return
    table = Table("task", "n", "exact match", "95% CI", "stopped", "time", title=f"adl eval {run_dir}: held-out problems (split seed {seed})",
                  title_justify="left")
    for r in rows:
        table.add_row(r["task"], str(r["n"]), f"{r['accuracy']:.1%}", f"{r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}",
                      f"{r['stopped'] / max(1, r['n']):.0%}", f"{r['seconds']:.1f} s")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval", rich_help_panel="Use")(evaluate)
