"""adl distill: a student trained on a teacher run's distributions, compared with the same student from scratch."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import default_out, resolve_recipe, set_option


def distill(
    recipe: str = typer.Argument(..., help="Distillation recipe TOML or a shipped one's name (text, text-reverse, tasks-forward, "
                                 "tasks-reverse): a pretraining or SFT recipe plus \\[teacher] run and \\[distill].", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="The student's run folder (default: runs/<recipe name>)."),
    scratch: Path = typer.Option(None, "--scratch", help="Also the same student without the teacher, in this folder (trained unless it "
                                 "already holds the finished run), for the comparison table.", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue the student from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace the runs already in --out (and --scratch)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object."),
) -> None:
    """Distil a teacher run into a smaller student: [bold]adl distill text --scratch runs/tiny-scratch[/]
    (the main job's shape taught by runs/small)"""
    import json

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.distill import load_distill_recipe
    from adl_cli.methods.distill_run import run_distill

    path = resolve_recipe(Path(recipe), command="distill")
    rec = load_distill_recipe(path, set_)
    out = out or default_out(path, rec.name)
    log = (lambda *a, **k: None) if as_json else console.print
    if is_main_env() and not as_json:
        console.print(f"[bold]adl distill[/] {path} -> {out} (teacher {rec.teacher.run})", highlight=False)
    report = run_distill(rec, out, scratch=scratch, resume=resume, force=force, progress=None if as_json else progress, log=log)
    if not report:
        return
    if as_json:
        print(json.dumps(report))
        return
    d = report["distill"]
    title = (f"adl distill {out}: {d['loss']}, T {d['temperature']:g}, alpha {d['alpha']:g}" + (f", top {d['top_k']}" if d["top_k"] else "")
             + (f", hidden x{d['hidden']:g}" if d["hidden"] else "") + (f", on-policy {d['on_policy']:.0%}" if d["on_policy"] else ""))
    rows = report["rows"]
    if report["kind"] == "text":
        t = Table("model", "params", "val loss", "val bpb", "tokens", "train s", title=title, title_justify="left")
        for name, r in rows.items():
            t.add_row(name, f"{r['parameters'] / 1e6:.2f}M", f"{r['val_loss']:.4f}", f"{r['val_bits_per_byte']:.4f}",
                      f"{r['tokens']:,}" if r["tokens"] else "-", f"{r['train_s']:.0f}" if r["train_s"] else "-")
    else:
        names = list(rows["distilled"]["tasks"])
        t = Table("model", "params", *names, title=title + " (exact match, 95% CI)", title_justify="left")
        for name, r in rows.items():
            t.add_row(name, f"{r['parameters'] / 1e6:.2f}M",
                      *[f"{r['tasks'][n]['accuracy']:.1%} ({r['tasks'][n]['ci95'][0]:.0%}-{r['tasks'][n]['ci95'][1]:.0%})" for n in names])
    console.print(t)
    s = report.get("stats") or {}
    if s:
        console.print(f"[dim]teacher forwards {s['teacher_batches']:,}, cache hits {s['cache_hits']:,}, on-policy batches {s['on_policy_batches']:,}; "
                      f"{out}/report.md, {out}/distill.json[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("distill", rich_help_panel="Compress")(distill)
