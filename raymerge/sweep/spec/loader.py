"""Strict YAML in: a spec file read, refused if hostile or ambiguous, and validated.

Example:
    >>> spec = parse_spec({"base_model": "./base", "adapters": {"a": "./a", "b": "./b"},
    ...     "output": "./out", "combinations": [{"adapters": ["a", "b"], "weights": [[0.5, 0.5]],
    ...     "methods": [{"combination_type": "linear"}]}]})
    >>> spec.engine
    'fast'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raymerge.errors import SpecError
from raymerge.sweep.spec.errors import describe_error, describe_yaml_error
from raymerge.sweep.spec.models import SweepSpec

MAX_SPEC_BYTES = 16 * 2**20
"""A spec file larger than this is refused unread."""
MAX_SPEC_VALUES = 200_000
"""Values a spec may stand for once YAML aliases are expanded (an alias bomb stands for
billions): far above any real sweep's spec, far below what validation could walk in a second."""


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a YAML sweep spec; `overrides` (from the CLI) replace top-level keys.

    Raises SpecError listing every problem found, each naming its key and value.
    """
    raw = read_spec_file(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_spec(raw)


def parse_spec(raw: dict[str, Any]) -> SweepSpec:
    """Validate a spec given as a dict; raises SpecError listing every problem."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([describe_error(error) for error in exc.errors()]) from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec file's YAML mapping, unvalidated; SpecError if it is missing, too large, not a
    YAML mapping, has a duplicate key, or stands for more than MAX_SPEC_VALUES values once its
    aliases are expanded. Errors name lines and keys, never echo the file's text."""
    path = Path(path)
    raw = _parse_yaml(_read_text(path), path)
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: the spec must be a YAML mapping of keys (base_model, adapters, …)"
        )
    _check_expanded_size(raw, path)
    return raw


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES >> 20} MB; is it a spec?")
        return path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {path} cannot be read: {type(exc).__name__}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise SpecError(
            f"{path}: {exc}; each key may appear once in a mapping: remove or rename one"
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {describe_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {type(exc).__name__}") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a spec") from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML allows them: the last one would win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


def _check_expanded_size(raw: Any, path: Path) -> None:
    """Refuse alias bombs and recursive aliases: count what the document stands for, each shared
    node once (memoised), so that counting itself stays linear in the file."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, list | dict):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SpecError(f"{path}: a YAML alias refers to itself (a recursive structure)")
        active.add(key)
        children = value.values() if isinstance(value, dict) else value
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        sizes[key] = total
        if total > MAX_SPEC_VALUES:
            raise SpecError(
                f"{path}: the spec stands for more than {MAX_SPEC_VALUES:,} values once its YAML "
                "aliases (*name) are expanded; write it without such nested aliases"
            )
        return total

    try:
        size(raw)
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a spec") from None
