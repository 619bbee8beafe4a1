"""The one error type that reaches the user as a clean message instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdlError(Exception):
    """An error caused by the user's input (a file, a recipe, a flag).

    The CLI prints ``str(err)`` in one line and exits with ``exit_code`` (2 by default).
    """

    exit_code = 2


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
