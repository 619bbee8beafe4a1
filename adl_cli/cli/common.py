"""Helpers shared by command modules: options that read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

SET_HELP = "Override a recipe key, e.g. --set train.steps=200 --set model.attention=flash (repeatable)."


def set_option(help: str = SET_HELP):
    return typer.Option(None, "--set", "-s", help=help, metavar="KEY=VALUE")


def default_out(recipe_path: Path, name: str) -> Path:
    """runs/<name>; a recipe inside a run folder (runs/X/recipe.toml) writes back to that folder."""
    recipe_path = Path(recipe_path)
    if recipe_path.name == "recipe.toml" and any((recipe_path.parent / f).exists() for f in ("config.json", "adapter.json")):
        return recipe_path.parent
    return Path("runs") / name


def resolve_recipe(recipe: Path, command: str = "pretrain") -> Path:
    """A recipe path as given, or the shipped recipe of that name (`adl pretrain tiny`), the
    command's own first (`adl sft tiny` is recipes/sft/tiny.toml)."""
    recipe = Path(recipe)
    if recipe.exists() or recipe.suffix or len(recipe.parts) > 1:
        return recipe
    from adl_cli.cli.recipes import find_recipe

    return find_recipe(str(recipe), prefer=command)



def plot_option():
    return typer.Option(None, "--plot", help="Also draw the figure as a PNG here (an existing file needs --force).", metavar="PATH.png")


def new_output(path: Path | None, force: bool, what: str = "file", suffix: str | None = None) -> Path | None:
    """An output file the user named: refuse to replace an existing one unless --force."""
    from adl_cli.errors import AdlError

    if path is None:
        return None
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise AdlError(f"{path}: give a path ending in {suffix}")
    if path.is_dir():
        raise AdlError(f"{path} is a folder; give a {what} path")
    if path.exists() and not force:
        raise AdlError(f"{path} exists; choose another path or pass --force to replace it")
    return path


def check_device(device: str) -> str:
    """--device of the bench commands: cpu, or cuda where there is one."""
    from adl_cli.errors import AdlError

    if device not in ("cpu", "cuda"):
        raise AdlError(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise AdlError("--device cuda: no CUDA device here")
    return device


def run_recipe_command(command: str, recipe: str, sets: list[str], out: Path | None, load, run, *, resume: bool, force: bool,
                       progress: bool, as_json: bool) -> tuple[dict | None, Path]:
    """A lab command's common part: the recipe resolved (a path or a shipped name) and loaded with
    the --set overrides, the run announced and run (quiet with --json). Returns (the summary, or
    None where nothing is left to print: another rank, or --json, which printed it; the run folder)."""
    import json

    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env

    path = resolve_recipe(Path(recipe), command=command)
    rec = load(path, sets)
    out = out or default_out(path, rec.name)
    log = (lambda *a, **k: None) if as_json else console.print
    if is_main_env() and not as_json:
        console.print(f"[bold]adl {command}[/] {path} -> {out}", highlight=False)
    outcome = run(rec, out, resume=resume, force=force, progress=progress and not as_json, log=log)
    if not outcome.main:
        return None, out
    if as_json:
        print(json.dumps(outcome.summary))
        return None, out
    return outcome.summary, out

