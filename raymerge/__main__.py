"""`python -m raymerge` is the `raymerge` command."""

from raymerge.cli import app

app()
