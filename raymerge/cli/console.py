"""The two consoles every command prints to: `consoles.out` (stdout) and `consoles.err`."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def _width() -> int | None:
    """Off a terminal (job logs, pipes) tables get COLUMNS or 120 columns rather than rich's
    default 80; read when a command runs, not at import."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() else 120


class Consoles:
    """stdout and stderr consoles, made on first use. soft_wrap: paths and URIs stay whole on one
    line, for copying and for logs."""

    def __getattr__(self, name: str) -> Console:
        if name not in ("out", "err"):
            raise AttributeError(name)
        console = Console(stderr=name == "err", soft_wrap=True, width=_width())
        setattr(self, name, console)
        return console


consoles = Consoles()
