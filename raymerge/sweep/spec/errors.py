"""One-line messages for what is wrong with a spec: pydantic's errors and PyYAML's, each naming
its key or line and never echoing a secret.

Example:
    >>> describe_error({"loc": ("combinations", 0, "explicit", "weights"), "type": "too_short",
    ...                 "msg": "List should have at least 1 item", "input": []})
    'combinations[0].weights: List should have at least 1 item (got [])'
"""

from __future__ import annotations

from typing import Any

import yaml

# Pydantic's tags for which member of the group union it tried: not keys the user wrote.
_GROUP_TAGS = ("explicit", "choose")


def describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's message without its snippet of the file (the line may hold a pasted secret).

    Example:
        >>> try:
        ...     yaml.safe_load('a: "x')
        ... except yaml.MarkedYAMLError as exc:
        ...     print(describe_yaml_error(exc))
        line 1, column 6: found unexpected end of stream (while scanning a quoted scalar)
    """
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({exc.context})" if exc.context else ""
    return f"{where}{exc.problem or 'syntax error'}{context}"


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as `combinations[0].methods[1].density: <message> (got <value>)`."""
    loc = list(error["loc"])
    # pydantic's marker for a bad dict key (only `adapters` has constrained keys)
    if "[key]" in loc:
        return f"{loc[0]}: name {error['input']!r} may only use letters, digits, '.', '_' and '-'"
    key = _key_path(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return (
            f"{key}: unknown key; check its spelling (every key is in the documentation: "
            "docs/guides/sweeps-and-specs.md, and the built site's spec reference)"
        )
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if key.startswith("storage_options") or "got " in message or error["type"] == "value_error":
        return f"{key}: {message}"  # never echo storage_options values: they may hold secrets
    return f"{key}: {message} (got {error.get('input')!r})"


def _key_path(loc: list[Any]) -> str:
    """A pydantic location as the user wrote the key: `combinations[0].methods[1].density`."""
    key = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            key += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and part in _GROUP_TAGS:
            continue  # the discriminator's tag, not a key the user wrote
        else:
            key += f".{part}" if key else str(part)
    return key
