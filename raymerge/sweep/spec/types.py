"""What every model of the sweep spec shares: the frozen base, adapter names, grids and limits.

Example:
    >>> as_grid(0.5), as_grid([0.2, 0.8]), as_grid(None)
    ([0.5], [0.2, 0.8], None)
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints

from raymerge.merge.registry import METHODS, RENAMED

T = TypeVar("T")

AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
"""An adapter's name in the spec: letters, digits, `.`, `_` and `-`."""

SINGLE_ADAPTER_HINT = (
    "a merge needs at least 2 adapters (PEFT silently turns a one-adapter merge into `linear`)"
)

FLOAT32_MAX = 3.4028234663852886e38
"""The merge arithmetic is float32: a weight beyond this is infinite there."""


def as_grid(value: Any) -> Any:
    """A scalar is a one-value grid: `density: 0.5` means `density: [0.5]`."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    return [value]


Grid = Annotated[list[T] | None, BeforeValidator(as_grid)]
"""A value or a list of values to sweep over (None: not given)."""


class FrozenModel(BaseModel):
    """The base of every spec model: immutable, unknown keys and inf/nan refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def require_known_types(names: list[str]) -> None:
    """Raise ValueError (a validator's message) naming the first unknown combination type."""
    for name in names:
        if name in RENAMED:
            raise ValueError(f"combination type {name!r} is now {RENAMED[name]}: write one of them")
        if name not in METHODS:
            raise ValueError(f"unknown combination type {name!r}; use one of: {', '.join(METHODS)}")
