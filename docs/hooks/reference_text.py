"""What the reference pages share: Markdown table cells and paragraphs, values as YAML, the
docstrings written under attributes."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import re
import textwrap
from typing import Any

import yaml

WORDS = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any value"}
"""Python's types in the words the reference uses for them."""


def cell(text: str | None) -> str:
    """`text` as one Markdown table cell: one line, `|` escaped, and `<`, `>` and `&` escaped
    outside code spans (so `DIR/<merge_id>/` is not taken for HTML)."""
    if not text:
        return "—"
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def paragraphs(text: str | None) -> str:
    """A docstring as Markdown paragraphs (its hard line breaks joined)."""
    if not text:
        return ""
    blocks = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(cell(block).replace("\\|", "|") for block in blocks)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def as_yaml(value: Any) -> str:
    """A value as a spec would write it: YAML flow style on one line, a string quoted where YAML
    would read it as something else (or where it holds spaces or control characters)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{as_yaml(k)}: {as_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(as_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z0-9_./:+-]+", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    return json.dumps(value)


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each attribute of `cls` and its bases (the nearest class wins), read
    from their source as pydantic's `use_attribute_docstrings` does; a class without source (made
    by create_model) has none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] in ("builtins", "pydantic", "enum"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            targets = node.targets if isinstance(node, ast.Assign) else []
            targets = [node.target] if isinstance(node, ast.AnnAssign) else targets
            text = after.value.value if isinstance(after, ast.Expr) else None
            if isinstance(text, str):
                docs |= {t.id: inspect.cleandoc(text) for t in targets if isinstance(t, ast.Name)}
    return docs
