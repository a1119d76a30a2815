"""A grid's `methods` entry: a combination type and its parameter grids, built from the registry.

Example:
    >>> entry = MethodSpec.model_validate({"combination_type": "ties", "density": [0.3, 0.6]})
    >>> entry.count()
    2
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from raymerge.merge.registry import METHODS, PARAMS, SIGN_METHODS, Param
from raymerge.sweep.spec.types import FrozenModel, Grid, require_known_types


class _MethodBase(FrozenModel):
    """One entry of a group's `methods`: a combination type and its parameters.

    Any parameter given as a list is a grid: one merge per value, cartesian over all lists. The
    parameters, their checks and defaults come from the method registry (raymerge.merge.registry).
    """

    combination_type: Grid[str]
    """Combination type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, ..."""

    @field_validator("*")
    @classmethod
    def _grid_not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("empty list: give a value, or a list of values to sweep over")
        return value

    @field_validator("combination_type")
    @classmethod
    def _known_type(cls, value: list[str]) -> list[str]:
        require_known_types(value)
        if len(set(value)) != len(value):
            raise ValueError(f"{value} lists a combination type twice")
        return value

    @model_validator(mode="after")
    def _params_fit_types(self) -> _MethodBase:
        methods = [METHODS[name] for name in self.combination_type or []]
        for param in PARAMS:
            if getattr(self, param) is not None and not any(m.takes(param) for m in methods):
                names = ", ".join(m.name for m in methods)
                raise ValueError(f"{param} does not apply to combination type {names}; remove it")
        for param in dict.fromkeys(p for m in methods for p in m.required()):
            if getattr(self, param) is None:
                needing = ", ".join(m.name for m in methods if param in m.required())
                raise ValueError(
                    f"{param} is required for {needing}: add e.g. `{param}: 0.5` "
                    f"({PARAMS[param].doc.rstrip('.').lower()})"
                )
        return self

    def expand(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (combination_type, params) this entry stands for, defaults filled in."""
        for combination_type in self.combination_type or []:
            defaults = METHODS[combination_type].defaults()
            grids = {p: getattr(self, p) or [defaults[p]] for p in defaults}
            for values in itertools.product(*grids.values()):
                yield combination_type, dict(zip(grids, values, strict=True))

    def count(self) -> int:
        """How many (combination_type, params) pairs `expand` yields."""
        return sum(1 for _ in self.expand())


def _param_check(param: Param):
    def check(cls, value: list | None) -> list | None:
        for item in value or []:
            problem = param.check(item)
            if problem:
                raise ValueError(problem)
        return value

    return field_validator(param.name)(classmethod(check))


MethodSpec = create_model(
    "MethodSpec",
    __base__=_MethodBase,
    __doc__=_MethodBase.__doc__,
    __validators__={f"_check_{p.name}": _param_check(p) for p in PARAMS.values()},
    **{
        p.name: (Grid[Literal[SIGN_METHODS] if p.name == "majority_sign_method" else p.kind],
                 Field(default=None, description=p.doc))
        for p in PARAMS.values()
    },
)  # fmt: skip
"""A `methods` entry, with one optional field per registry parameter."""
