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
    if recipe_path.name == "recipe.toml" and (recipe_path.parent / "config.json").exists():
        return recipe_path.parent
    return Path("runs") / name


def resolve_recipe(recipe: Path) -> Path:
    """A recipe path as given, or the shipped recipe of that name (`adl pretrain tiny`)."""
    recipe = Path(recipe)
    if recipe.exists() or recipe.suffix or len(recipe.parts) > 1:
        return recipe
    from adl_cli.cli.recipes import find_recipe

    return find_recipe(str(recipe))

