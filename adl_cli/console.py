"""The consoles every command prints on, and which process of a launch may print.

``console`` is stdout, ``console_err`` stderr. When stdout is not a terminal (a pipe, a
file, nohup, CI) rich would wrap long lines at 80 columns; machine-readable output must
never be wrapped, so such output is written with ``soft_wrap=True`` (see ``print_raw``).
"""

from __future__ import annotations

import os

from rich.console import Console

console = Console()
console_err = Console(stderr=True)
for _c in (console, console_err):
    _c.soft_wrap = not _c.is_terminal  # logs and pipes get whole lines; a terminal wraps as usual


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched)."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def is_main_env() -> bool:
    """True in the process that prints and writes files (before any accelerator exists)."""
    return env_rank() == 0


def print_raw(text: str, *, err: bool = False) -> None:
    """Text exactly as given (no markup, no highlighting, no wrapping): TOML, JSON, ids."""
    (console_err if err else console).print(text, markup=False, highlight=False, soft_wrap=True, end="" if text.endswith("\n") else "\n")
