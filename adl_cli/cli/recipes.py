"""adl recipes: list, show and copy the recipes that ship with adl."""

from __future__ import annotations

from adl_cli.fileio import atomic_copy
import tomllib
from pathlib import Path

import typer

from adl_cli.errors import AdlError, closest

recipes_app = typer.Typer(help="The recipes that ship with adl.", no_args_is_help=True)


def recipes_root() -> Path:
    """recipes/ beside the package (a source checkout or editable install), else ./recipes."""
    here = Path(__file__).resolve().parents[2] / "recipes"
    return here if here.is_dir() else Path("recipes")


def all_recipes() -> dict[str, Path]:
    root = recipes_root()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.toml"))}


def find_recipe(name: str, prefer: str = "pretrain") -> Path:
    """A shipped recipe by its path under recipes/ (``sft/tiny``) or its name; a name several
    commands share (``tiny``) is the ``prefer`` command's (pretrain unless a command says)."""
    table = all_recipes()
    if name in table:
        return table[name]
    if f"{prefer}/{name}" in table:
        return table[f"{prefer}/{name}"]
    by_stem = [k for k in table if k.split("/")[-1] == name]
    if len(by_stem) == 1:
        return table[by_stem[0]]
    if len(by_stem) > 1:
        raise AdlError(f"recipe name '{name}' is ambiguous: {', '.join(by_stem)}")
    hint = closest(name, table) or closest(name, {k.split("/")[-1] for k in table})
    raise AdlError(f"no recipe named '{name}'{hint}; `adl recipes list` shows them")


def _description(path: Path) -> str:
    try:
        return tomllib.loads(path.read_text()).get("description", "")
    except tomllib.TOMLDecodeError:
        return "(invalid TOML)"


@recipes_app.command("list")
def list_() -> None:
    """One line per shipped recipe."""
    from rich.table import Table

    from adl_cli.console import console

    t = Table("recipe", "description", title=f"recipes in {recipes_root()}", title_justify="left")
    for name, path in all_recipes().items():
        t.add_row(name, _description(path))
    console.print(t)


@recipes_app.command("show")
def show(name: str = typer.Argument(..., help="Recipe name, e.g. pretrain/tiny or tiny.")) -> None:
    """Print a recipe's TOML (exactly the file's text when piped: `adl recipes show tiny > my.toml`)."""
    from adl_cli.console import console, print_raw

    text = find_recipe(name).read_text(encoding="utf-8")
    if console.is_terminal:
        from rich.syntax import Syntax

        console.print(Syntax(text, "toml", theme="ansi_dark", word_wrap=False), soft_wrap=True)
    else:
        print_raw(text)


@recipes_app.command("cp")
def cp(
    name: str = typer.Argument(..., help="Recipe name."),
    dest: Path = typer.Argument(..., help="Where to write the copy (a file or a folder)."),
) -> None:
    """Copy a recipe to edit it."""
    from adl_cli.console import console

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists():
        raise AdlError(f"{target} exists; not overwriting it")
    if not target.parent.exists():
        raise AdlError(f"folder {target.parent} does not exist")
    atomic_copy(src, target)
    console.print(f"copied {src} -> {target}")


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes", rich_help_panel="Use")
