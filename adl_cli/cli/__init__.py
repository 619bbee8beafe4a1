"""The `adl` Typer app. Each command lives in its own module and only parses and prints."""

from __future__ import annotations

import sys

import typer

from adl_cli import __version__
from adl_cli.errors import AdlError

app = typer.Typer(
    name="adl",
    help="A command-line lab for advanced deep learning.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """A command-line lab for advanced deep learning."""


def _register() -> None:
    # One line per command module; each module exposes `register(app)`.
    from adl_cli.cli import commands  # noqa: F401  (the list lives there)

    for module in commands.MODULES:
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    from adl_cli.engine.report import console_err

    _register()
    try:
        app(args=argv, standalone_mode=False)
    except AdlError as err:
        console_err.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise
