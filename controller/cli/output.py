"""Terminal output shared by the CLI's commands."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    # Made per command so COLUMNS and the terminal in force at call time apply.
    return Console()
