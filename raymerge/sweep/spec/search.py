"""The spec's `search` section: an adaptive search's adapters, ranges, budget and sampler.

Example:
    >>> search = SearchSpec.model_validate({"choose": 2, "budget": 20,
    ...     "methods": [{"combination_type": "ties", "density": {"low": 0.2, "high": 0.8}}]})
    >>> search.sampler_name(), search.methods[0].params()["density"].high
    ('tpe', 0.8)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from raymerge.merge.registry import METHODS, PARAMS
from raymerge.sweep.spec.evaluate import Objectives
from raymerge.sweep.spec.types import (
    FLOAT32_MAX,
    SINGLE_ADAPTER_HINT,
    AdapterName,
    FrozenModel,
    Grid,
    require_known_types,
)


class Range(FrozenModel):
    """A range to search: `{low: 0.1, high: 0.9}` (`log: true` samples on a log scale)."""

    low: float
    """The range's lower end."""
    high: float
    """The range's upper end (above `low`)."""
    log: bool = False
    """Sample on a log scale (needs low > 0)."""

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low:g} must be below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if max(abs(self.low), abs(self.high)) > FLOAT32_MAX:
            raise ValueError("the range overflows float32, in which merges are computed")
        return self


SearchParam = Range | list[Any] | float | int | bool | str
"""A method parameter in a search: a range, a list of choices, or one value."""


class SearchMethodSpec(FrozenModel):
    """Combination types a search may pick, and each parameter's range or choices."""

    model_config = ConfigDict(frozen=True, extra="allow")

    combination_type: Grid[str]
    """The types the search may pick from (one, or a list); any other key is a parameter of
    them, given as a range, a list of choices or one value."""

    @model_validator(mode="after")
    def _params(self) -> SearchMethodSpec:
        require_known_types(self.combination_type or [])
        methods = [METHODS[n] for n in self.combination_type]
        for param, value in self.params().items():
            if param not in PARAMS:
                raise ValueError(f"{param}: unknown parameter; they are: {', '.join(PARAMS)}")
            if not any(m.takes(param) for m in methods):
                names = ", ".join(m.name for m in methods)
                raise ValueError(f"{param} does not apply to combination type {names}; remove it")
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not value:
                raise ValueError(f"{param}: an empty list of choices")
            for item in values:
                probes = [item.low, item.high] if isinstance(item, Range) else [item]
                for probe in probes:
                    problem = PARAMS[param].check(probe)
                    if problem:
                        raise ValueError(problem)
        for method in methods:
            for required in method.required():
                if required not in self.params():
                    raise ValueError(
                        f"{required} is required for {method.name}: give a range "
                        f"({{low: 0.2, high: 0.8}}), choices or a value"
                    )
        return self

    def params(self) -> dict[str, Any]:
        """The parameters given (ranges as Range), by name."""
        out = {}
        for name, value in (self.model_extra or {}).items():
            if isinstance(value, dict):
                value = Range.model_validate(value)
            out[name] = value
        return out


class SearchSpec(FrozenModel):
    """An adaptive search over merges, asked of Optuna and evaluated on the worker pool."""

    model_config = ConfigDict(populate_by_name=True)

    adapters: list[AdapterName] | None = None
    """A fixed set of adapters to merge (at least 2)..."""
    choose: int | None = None
    """...or subsets of this size of `from` (default: all of the spec's adapters)."""
    from_: list[AdapterName] | None = Field(default=None, alias="from")
    """The adapters `choose` picks subsets of (default: all of the spec's adapters)."""
    weights: Range | dict[AdapterName, Range] = Field(default_factory=lambda: Range(low=0, high=1))
    """Each weight's range: one for all, or one per adapter."""
    methods: list[SearchMethodSpec] = Field(min_length=1)
    """The combination types the search may pick, and their parameters' ranges or choices."""
    objectives: Objectives | None = None
    """Several metrics for a Pareto search (default: evaluate.objective, one value)."""
    budget: int = Field(ge=1, le=1_000_000)
    """What the search may spend (a rerun continues up to it), in `budget_unit`s."""
    budget_unit: Literal["trials", "evaluations"] = "trials"
    """trials: `budget` candidates, each scored fully unless pruned; evaluations: `budget` full
    evaluations' worth of examples, a pruned candidate costing only the share it was scored
    on, so that pruning buys more candidates (at most 10 x `budget` of them)."""
    sampler: Literal["tpe", "cmaes", "nsga2", "random", "qmc"] | None = None
    """Default: tpe for one objective, nsga2 for several."""
    seed: int = 0
    """The sampler's seed (Optuna's `seed`)."""
    pruner: Literal["wilcoxon", "halving", "none"] = "wilcoxon"
    """With `evaluate.racing`: each candidate is scored round by round and Optuna's pruner
    stops it when it is behind (WilcoxonPruner: a signed-rank test against the best trial,
    example by example; halving: SuccessiveHalvingPruner); none: every candidate fully."""
    candidates_per_worker: int = Field(default=1, ge=1, le=3)
    """Candidates out on each worker at once: 1 (default) asks each knowing every result of its
    worker (`raymerge bench search` measures what more costs); 2-3 keep a worker busy between a
    result and the next candidate."""
    constant_liar: bool = True
    """TPE: count candidates still being scored as poor results, so that candidates out at once
    spread out (`raymerge bench search` measures it)."""
    startup_trials: int | None = Field(default=None, ge=0)
    """Trials TPE samples at random before it models (default: a quarter of the budget, from 3
    to 10)."""

    @model_validator(mode="after")
    def _shape(self) -> SearchSpec:
        if (self.adapters is None) == (self.choose is None):
            raise ValueError("give either `adapters` (a fixed set) or `choose: k`")
        if self.adapters is not None and len(self.adapters) < 2:
            raise ValueError(f"adapters: {SINGLE_ADAPTER_HINT}")
        if self.choose is not None and self.choose < 2:
            raise ValueError(f"choose: {self.choose} is too small; {SINGLE_ADAPTER_HINT}")
        several = self.objectives is not None and len(self.objectives) > 1
        if several and self.sampler in ("tpe", "cmaes", "qmc"):
            raise ValueError(
                f"sampler {self.sampler} optimises one objective; use nsga2 (or random) for "
                "several objectives"
            )
        if not several and self.sampler == "nsga2":
            raise ValueError("sampler nsga2 is for several objectives; use tpe or cmaes")
        return self

    def sampler_name(self) -> str:
        """The sampler asked for, else the default: tpe for one objective, nsga2 for several."""
        several = self.objectives is not None and len(self.objectives) > 1
        return self.sampler or ("nsga2" if several else "tpe")
