"""Rich output shared by every command: consoles, tables, a terminal loss curve."""

from __future__ import annotations

from rich.console import Console

console = Console()
console_err = Console(stderr=True)
