"""`python -m raymerge.cli` is the `raymerge` command."""

from raymerge.cli import app

app()
