"""Helpers shared by command modules: options that read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import typer

SET_HELP = "Override a recipe key, e.g. --set train.steps=200 --set model.attention=flash (repeatable)."


def set_option():
    return typer.Option(None, "--set", "-s", help=SET_HELP, metavar="KEY=VALUE")


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
