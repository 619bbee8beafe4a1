"""adl vision: an image model family (ViT, axial attention, Swin, Perceiver, MLP-Mixer, PoolFormer, FNet, a small CNN,
slot attention) trained on an image set."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import set_option


def vision(
    recipe: str = typer.Argument(..., help="Vision recipe TOML or a shipped one's name (vit, axial, swin, perceiver, mixer, "
                                 "poolformer, fnet, cnn: one per family, on the digits; slots: slot attention on the sprites).", show_default=False),
    set_: list[str] = set_option(),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object (nothing else on stdout)."),
) -> None:
    """Train an image model family: [bold]adl vision vit[/], [bold]adl vision mixer --set data.set=shapes --set model.patch=4[/]"""
    from rich.table import Table

    from adl_cli.cli.common import run_recipe_command
    from adl_cli.console import console
    from adl_cli.methods.vision import load_vision_recipe, run_vision

    s, out = run_recipe_command("vision", recipe, set_, out, load_vision_recipe, run_vision, resume=resume, force=force,
                                progress=progress, as_json=as_json)
    if s is None:
        return
    from adl_cli.engine.plots import loss_figure
    from adl_cli.engine.report import read_metrics

    loss_figure(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"adl vision {out.name}")
    title = f"{s['family']} on {s['set']} ({s['parameters']:,} parameters)"
    if s.get("objective") == "reconstruct":
        t = Table("split", "images", "recon. MSE", "FG-ARI", "95% CI", title=title, title_justify="left")
        rows = [(name, str(s[name]["n"]), f"{s[name]['mse']:.5f}", s[name]["fg_ari"]) for name in ("val", "test")]
        rows += [(b["name"].replace("k-means on pixel ", "k-means: "), str(s["test"]["n"]), "", b["fg_ari"]) for b in s["baselines"]]
        for name, n, mse, a in rows:
            t.add_row(name, n, mse, f"{a['mean']:.3f}", f"{a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}")
    else:
        t = Table("split", "images", "loss", "top-1", "95% CI", title=title, title_justify="left")
        for name in ("val", "test"):
            r = s[name]
            t.add_row(name, str(r["n"]), f"{r['loss']:.4f}", f"{r['accuracy']:.2%}", f"{r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}")
    console.print(t)
    console.print(f"{s['steps']} steps, {s['images_seen']:,} images in {s['train_wall_s']:.0f} s", highlight=False)
    console.print(f"[dim]run folder: {out} (report.md, {', '.join(s['figures'])}, loss.png, summary.json, model.safetensors)[/]",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("vision", rich_help_panel="Labs")(vision)
