"""The one error type that reaches the user as a clean message instead of a traceback."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_MARK = "\x1f"
_OPTION = re.compile(_MARK + r"([A-Za-z_][A-Za-z0-9_]*)" + _MARK)


def opt(name: str) -> str:
    """A parameter named in an error message. The library shows it as its Python name
    (``temperature``); the CLI, which knows its flags are the parameters in kebab case, as
    ``--temperature`` (``AdlError.cli_message``). Library code never spells a flag itself."""
    return f"{_MARK}{name}{_MARK}"


def render(text: str, *, cli: bool) -> str:
    return _OPTION.sub(lambda m: "--" + m[1].replace("_", "-") if cli else m[1], text)


class AdlError(Exception):
    """An error caused by the user's input (a file, a recipe, a parameter).

    The CLI prints ``cli_message()`` in one line and exits with ``exit_code`` (2 by default);
    ``str(err)`` is the same text with parameters named as in Python (see ``opt``).
    """

    exit_code = 2

    def __str__(self) -> str:
        return render(super().__str__(), cli=False)

    def cli_message(self) -> str:
        return render(super().__str__(), cli=True)


class Interrupted(AdlError):
    """The user (Ctrl-C: exit 130) or the scheduler (SIGTERM: exit 143) stopped a run; state was saved."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> AdlError:
    choices = sorted(choices)
    return AdlError(f"unknown {kind} '{name}'{closest(name, choices)}; choose from: {', '.join(choices)}")


def pick(option: str, text: str | None, choices: Iterable[str], what: str = "name") -> list[str]:
    """A comma-separated ``--option`` value as names among ``choices`` (all of them when empty);
    an unknown or repeated name is an AdlError naming the option."""
    choices = list(choices)
    names = [n.strip() for n in (text or ",".join(choices)).split(",") if n.strip()]
    for name in names:
        if name not in choices:
            raise AdlError(f"{opt(option)}: unknown {what} '{name}'{closest(name, choices)}; choose among {', '.join(choices)}")
    if len(set(names)) != len(names):
        raise AdlError(f"{opt(option)} names a {what} twice")
    return names
