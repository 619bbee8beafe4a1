"""adl lora: parameter-efficient fine-tuning (LoRA, DoRA, QLoRA, bottleneck adapters, or full
fine-tuning for comparison); `adl lora merge RUN --out DIR` folds an adapter into plain weights."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import default_out, resolve_recipe, set_option


def lora(
    recipe: str = typer.Argument(..., help="Recipe TOML (recipes/lora/addition.toml), a shipped recipe's name (addition, qlora, dora, adapter, full, text), "
                                 "or 'merge' to fold an adapter run into a plain run (adl lora merge RUN --out DIR).", show_default=False),
    run: Path = typer.Argument(None, help="With 'merge': the adapter run to fold.", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>); with 'merge', the plain run folder to write (required)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings."),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure the starting run (its held-out loss and, on tasks, its exact match) for the report."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure the peak tensor memory of one training step before training (one extra step)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
) -> None:
    """Fine-tune a run with adapters: [bold]adl lora addition[/] (LoRA on runs/tiny), [bold]adl lora merge runs/addition-lora --out runs/merged[/]"""
    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.errors import AdlError, opt

    if recipe == "merge":
        if run is None:
            raise AdlError("adl lora merge: name the adapter run to fold, e.g. adl lora merge runs/addition-lora --out runs/merged")
        if out is None:
            raise AdlError(f"adl lora merge: {opt('out')} names the plain run folder to write")
        from adl_cli.methods.lora import merge_run

        merge_run(run, out, force=force)
        console.print(f"merged {run} into {out} (a plain run: adl generate {out}, adl export hf {out} DIR)", highlight=False)
        return
    if run is not None:
        raise AdlError(f"adl lora {recipe}: unexpected second argument {run} (only 'merge' takes a run)")
    from adl_cli.methods.finetune import load_finetune_recipe, run_finetune

    path = resolve_recipe(Path(recipe), command="lora")
    rec = load_finetune_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl lora[/] {path} ({rec.method}) -> {out}", highlight=False)
    outcome = run_finetune(rec, out, resume=resume, force=force, progress=progress, log=console.print, evaluate_base=base, measure_memory=memory)
    if outcome.main and outcome.summary:
        from adl_cli.engine.plots import loss_figure
        from adl_cli.engine.report import read_metrics

        print_summary(outcome.summary)
        loss_figure(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"adl lora {out.name} ({rec.method})")
        what = "adapter.safetensors + adapter.json naming its base" if rec.method != "full" else "model.safetensors"
        console.print(f"[dim]run folder: {out} (report.md, loss.png, summary.json, metrics.jsonl, {what}, tokenizer.json); "
                      f"use it: adl generate {out} / adl chat {out}[/]", highlight=False)


def print_summary(s: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from adl_cli.console import console

    mem = f"{s['peak_tensor_bytes'] / 2**20:,.1f} MiB" if s.get("peak_tensor_bytes") else "-"
    t = Table("method", "trainable", "peak memory", "ms/step", "held-out loss", title=f"fine-tuning {s['name']} from {s['init']}", title_justify="left")
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.3f}"
    if s.get("base_val_loss") is not None:
        val += f" (base {s['base_val_loss']:.3f})"
    t.add_row(s["method"], f"{s['trainable_parameters']:,} ({s['trainable_share']:.2%})", mem, f"{s['step_s'] * 1e3:.0f}", val)
    console.print(t)
    if s["tasks"]:
        e = Table("task", "n", "base", "exact match (95% CI)", title="exact match on held-out problems", title_justify="left")
        for name, r in s["tasks"].items():
            a, b = r["sft"], r["base"]
            e.add_row(name, str(a["n"]), "-" if b is None else f"{b['accuracy']:.1%}", f"{a['accuracy']:.1%} ({a['ci95'][0]:.1%}-{a['ci95'][1]:.1%})")
        console.print(e)
        for name, r in s["tasks"].items():
            for smp in r["sft"]["samples"][:2]:
                mark = "[green]right[/]" if smp["correct"] else "[red]wrong[/]"
                console.print(f"  {name}: {escape(smp['question'])} -> {escape(smp['answer'])} ({mark})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("lora", rich_help_panel="Train")(lora)
