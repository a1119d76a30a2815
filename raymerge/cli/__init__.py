"""The `raymerge` command: each command parses, calls one function, prints and maps errors to
exit codes (0 ok, 1 failures, 2 bad input)."""

from raymerge.cli.app import app

__all__ = ["app"]
