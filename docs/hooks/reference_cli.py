"""The command reference (reference/cli.md): every command and sub-command of `raymerge`, with the
help, usage and help records (arguments and options) that its `--help` prints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from reference_text import cell, paragraphs, table


def commands(command, ctx) -> Iterator[tuple[Any, Any]]:
    """(command, context) for `command` and every sub-command under it, depth first, hidden ones
    left out."""
    yield command, ctx
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from commands(sub, sub.make_context(name, [], parent=ctx, resilient_parsing=True))


def command_anchor(ctx) -> str:
    return ctx.command_path.replace(" ", "-")


def command_section(command, ctx) -> str:
    help_text = (command.help or "").split("\f")[0]
    rows = [
        [f"`{opts}`", cell(text)]
        for param in command.get_params(ctx)
        if (record := param.get_help_record(ctx)) is not None
        for opts, text in [record]
    ]
    lines = [f"## `{ctx.command_path}` {{#{command_anchor(ctx)}}}", "", paragraphs(help_text)]
    lines += ["", "```text", command.get_usage(ctx), "```", ""]
    lines.append(table(["Argument or option", "Help"], rows))
    subs = [(n, c) for n, c in getattr(command, "commands", {}).items() if not c.hidden]
    if subs:
        lines += [
            "",
            table(
                ["Command", "What it does"],
                [
                    [f"[`{n}`](#{command_anchor(ctx)}-{n})", cell(c.get_short_help_str(limit=300))]
                    for n, c in subs
                ],
            ),
        ]
    return "\n".join(lines)


def cli_page(app: typer.Typer | None = None, name: str = "raymerge") -> str:
    """Every command of `app` (default: the `raymerge` command) as `--help` describes it."""
    from raymerge.cli import app as raymerge_app

    root = typer.main.get_command(app or raymerge_app)
    ctx = root.make_context(name, [], resilient_parsing=True)
    intro = (
        "# Command reference\n\nEvery command and sub-command, generated from the `raymerge` "
        "command itself when this site is built: the same help, usage and options that "
        "`raymerge COMMAND --help` prints."
    )
    return "\n\n".join([intro, *(command_section(c, x) for c, x in commands(root, ctx))]) + "\n"
