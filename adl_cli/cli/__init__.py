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


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage/click errors, aborts, no-args-help) of every click typer may carry.

    typer 0.29 bundles its own click as ``typer._click``; older typers use the ``click``
    package. Both are looked up, so usage errors never escape as tracebacks."""
    import importlib

    errors, aborts, helps = [], [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for found, attr in ((errors, "ClickException"), (aborts, "Abort"), (helps, "NoArgsIsHelpError")):
            if isinstance(getattr(mod, attr, None), type):
                found.append(getattr(mod, attr))
    return tuple(errors), tuple(aborts), tuple(helps)


def usage_line(err) -> str:
    """A click usage error as one line: the message and where to read more."""
    msg = " ".join(str(err.format_message()).split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        return f"{msg} (see '{ctx.command_path} --help')"
    return msg


def _stay_offline() -> None:
    """adl never downloads: the Hugging Face libraries it drives (transformers, peft, and
    bitsandbytes through the `kernels` package transformers brings) are told so, unless the user
    says otherwise, and bitsandbytes' note that its hub kernel could not be fetched stays quiet
    (its CPU kernels are used instead)."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _close_process_group() -> None:
    """Under torchrun/accelerate launch: every rank waits for the others, then leaves the group."""
    if "torch.distributed" in sys.modules:  # never imports torch for `adl --help`
        from adl_cli.engine.distributed import close_process_group

        close_process_group()


def _fail(message: str, code: int) -> None:
    """Print one error line (on the main process only: under torchrun every rank fails alike) and exit."""
    from adl_cli.console import console_err, is_main_env

    if is_main_env():
        console_err.print(message, highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


_COMMAND = None


def _click_command():
    """The click command typer builds from ``app``, built once per process: building it reads every
    command's signature (a third of a second), which a process calling ``main`` again (the tests)
    need not repeat."""
    global _COMMAND
    if _COMMAND is None:
        _COMMAND = typer.main.get_command(app)
    return _COMMAND


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit non-zero, never a traceback."""
    from rich.markup import escape

    _stay_offline()
    _register()
    click_errors, aborts, helps = _click_exceptions()
    try:
        _click_command().main(args=argv, standalone_mode=False, prog_name="adl")
        _close_process_group()
    except AdlError as err:
        _fail(f"[bold red]error:[/] {escape(err.cli_message())}", err.exit_code)
    except KeyboardInterrupt:
        _fail("[yellow]interrupted[/]", 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as err:
        if helps and isinstance(err, helps):  # `adl` or `adl data` alone: the help, as click does
            err.show()
            sys.exit(2)
        if click_errors and isinstance(err, click_errors):
            _fail(f"[bold red]error:[/] {escape(usage_line(err))}", getattr(err, "exit_code", 2) or 2)
        if aborts and isinstance(err, aborts):
            _fail("[yellow]aborted[/]", 1)
        if isinstance(err, OSError) and err.errno is not None:
            # a disk that fills up, a folder that cannot be written: name the file, no traceback
            where = f" {err.filename}" if err.filename else ""
            _fail(f"[bold red]error:[/] cannot write{escape(where)}: {escape(err.strerror or str(err))}", 1)
        raise
