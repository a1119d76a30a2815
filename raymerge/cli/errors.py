"""From exceptions to exit codes: 0 ok, 1 failures, 2 bad input (the error's `exit_code`)."""

from __future__ import annotations

import typer
from rich.text import Text

from raymerge.cli.console import consoles
from raymerge.errors import RaymergeError, SpecError


class exit_on_error:
    """Map raymerge's errors to a message on stderr and the error's exit code."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, RaymergeError):
            consoles.err.print(Text(f"error: {exc}", style="red"))
            raise typer.Exit(exc.exit_code)
        if exc is not None and not isinstance(exc, typer.Exit):
            from raymerge.store import storage

            if isinstance(exc, storage.errors()):  # the store or disk, not a bug: one line
                consoles.err.print(Text(f"error: storage: {storage.describe(exc)}", "red"))
                raise typer.Exit(1)
        return False


def usage(message: str) -> SpecError:
    """A bad option value: raise it inside `exit_on_error` to exit 2 with MESSAGE.

    >>> usage("--world 'x': use generated or demo").exit_code
    2
    """
    return SpecError(message)
