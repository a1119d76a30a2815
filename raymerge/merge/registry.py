"""THE registry of combination types: each is one `Method` entry carrying everything about it —
its parameters (defaults and validation), its rank rule, whether it draws random numbers, how its
merged factors are formed, and the per-element arithmetic the fast engine applies. The spec, the
plan, the compatibility rules and both engines read it; nothing matches type names by prefix.

Example:
    >>> METHODS["ties"].defaults()
    {'density': None, 'majority_sign_method': 'total'}
    >>> METHODS["cat"].rank is RankRule.SUM
    True
    >>> [m.name for m in METHODS.values() if m.random and m.peft]
    ['dare_linear', 'dare_ties', 'dare_linear_svd', 'dare_ties_svd']
    >>> METHODS["core_ties"].takes("alpha"), METHODS["core_ties"].peft
    (True, False)
    >>> METHODS["svd"].takes("density")
    False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from raymerge.merge import arithmetic

SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
SIGN_METHODS = ("total", "frequency")
TSV_BUDGETS = ("rank", "dims")
ISO_MEANS = ("nonzero", "all")
RENAMED = {
    "knots_dare": "knots_dare_ties (the KnOTS paper's DARE-TIES) or knots_dare_linear (the plain "
    "sum after DARE, which knots_dare was)"
}
"""Type names that no longer exist, and what to write instead: a name is never given a second
meaning (merge ids and records cover the name, not the code behind it)."""


class RankRule(StrEnum):
    """The merged adapter's rank, from its inputs' ranks."""

    EQUAL = "equal"
    """All inputs share one rank, which the merge keeps (the factors are combined per element)."""
    SUM = "sum"
    """The sum of the inputs' ranks (factors stacked)."""
    SVD = "svd"
    """`svd_rank`, default the largest input rank (the merged delta is refactored by SVD)."""


class Form(StrEnum):
    """How the fast engine builds the merged factors."""

    FACTORWISE = "factorwise"
    """Combine the inputs' A's and B's separately with `combine` (PEFT's per-element types)."""
    CONCAT = "concat"
    """Stack the scaled factors (exact: the delta is the weighted sum of the inputs')."""
    DELTA_SVD = "delta_svd"
    """Combine the inputs' deltas with `combine`, then truncate the result by SVD."""
    LOWRANK = "lowrank"
    """Merge in the inputs' own low-rank space (raymerge.merge.engines.lowrank), then truncate."""


@dataclass(frozen=True)
class Param:
    """A method parameter: PEFT's name, what it means and how a value is checked."""

    name: str
    doc: str
    kind: type
    check: Callable[[Any], str | None] = lambda value: None
    """Returns what is wrong with a value (None: fine)."""


def _unit_interval(name: str) -> Callable[[Any], str | None]:
    def check(value: float) -> str | None:
        if not 0 < value <= 1:
            return f"{name} {value} is outside (0, 1]; use e.g. 0.5"
        return None

    return check


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        if value not in choices:
            return f"{name} {value!r} is not one of {', '.join(choices)}"
        return None

    return check


PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("density", "Fraction of values kept, in (0, 1].", float, _unit_interval("density")),
        Param(
            "majority_sign_method",
            "TIES sign election: total (default) or frequency.",
            str,
            _one_of("majority_sign_method", SIGN_METHODS),
        ),
        Param(
            "svd_rank",
            "Rank of the merged adapter (default: the largest input rank).",
            int,
            lambda v: None if v >= 1 else f"svd_rank {v} must be at least 1",
        ),
        Param(
            "svd_clamp",
            "Quantile in (0, 1] at which the SVD factors are clamped (default: no clamping).",
            float,
            _unit_interval("svd_clamp"),
        ),
        Param("svd_full_matrices", "Passed to torch.linalg.svd (default: true).", bool),
        Param(
            "alpha",
            "Scales the merged delta (the papers' lambda; default 1).",
            float,
            lambda v: None if abs(v) <= 1e6 else f"alpha {v:g} is beyond +-1e6; use e.g. 1.0",
        ),
        Param(
            "k",
            "TSV: fraction of each task's budget of singular triplets kept, in (0, 1] (default "
            "1), rounded to nearest, at least 1; the budget is set by k_of.",
            float,
            _unit_interval("k"),
        ),
        Param(
            "k_of",
            "TSV: each task's budget that k is a fraction of: rank (default: the task's LoRA "
            "rank) or dims (the paper's int(min(out, in) / T) for T tasks, capped at the rank).",
            str,
            _one_of("k_of", TSV_BUDGETS),
        ),
        Param(
            "mean_over",
            "Iso-C: the singular values the flat spectrum averages: nonzero (default: those of "
            "the sum, at most the summed rank) or all (the paper's: all min(out, in) of them).",
            str,
            _one_of("mean_over", ISO_MEANS),
        ),
        Param(
            "svd_driver",
            "cuSOLVER driver for torch.linalg.svd on CUDA: gesvd, gesvdj or gesvda.",
            str,
            _one_of("svd_driver", SVD_DRIVERS),
        ),
    )
}
"""Every parameter a method entry may take besides `combination_type`."""

REQUIRED = object()
"""A parameter default meaning: the spec must give a value."""

_SVD_PARAMS = {
    "svd_rank": None,
    "svd_clamp": None,
    "svd_full_matrices": True,
    "svd_driver": None,
}
_SIGNS = {"majority_sign_method": "total"}
_DENSITY = {"density": REQUIRED}
_LOWRANK = {"svd_rank": None, "alpha": 1.0}


@dataclass(frozen=True)
class Method:
    """One combination type."""

    name: str
    doc: str
    rank: RankRule
    form: Form
    params: dict[str, Any] = field(default_factory=dict)
    """Parameter name -> default (REQUIRED: no default)."""
    combine: arithmetic.Combine | None = None
    """Per-element combination of the inputs' stacked tensors (FACTORWISE and DELTA_SVD)."""
    random: bool = False
    """Draws random numbers (DARE masks): seeded per merge."""
    peft: bool = True
    """PEFT's add_weighted_adapter implements it (so `engine: peft` can run it)."""

    def takes(self, param: str) -> bool:
        return param in self.params

    def required(self) -> list[str]:
        return [name for name, default in self.params.items() if default is REQUIRED]

    def defaults(self) -> dict[str, Any]:
        """Parameter defaults, so that an omitted default and an explicit one plan alike (a
        required parameter's placeholder is None)."""
        return {k: None if v is REQUIRED else v for k, v in self.params.items()}

    def merged_rank(self, ranks: list[int], params: dict[str, Any]) -> int:
        """The merged adapter's rank (as PEFT sizes it)."""
        if self.rank is RankRule.SUM:
            return sum(ranks)
        if self.rank is RankRule.SVD:
            return params.get("svd_rank") or max(ranks)
        return ranks[0]


def _registry(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry(
    Method(
        "linear",
        "Weighted sum of the A's and of the B's (PEFT: 'a very rough approximation').",
        RankRule.EQUAL,
        Form.FACTORWISE,
        combine=arithmetic.task_arithmetic,
    ),
    Method(
        "cat",
        "Stacked factors: exactly the weighted sum of the deltas, at the summed rank.",
        RankRule.SUM,
        Form.CONCAT,
    ),
    Method(
        "svd",
        "Weighted sum of the deltas, truncated to svd_rank by SVD (exact, low-rank).",
        RankRule.SVD,
        Form.DELTA_SVD,
        dict(_SVD_PARAMS),
        combine=arithmetic.task_arithmetic,
    ),
    Method(
        "ties",
        "TIES on the A's and B's: trim to density, elect signs, disjoint mean.",
        RankRule.EQUAL,
        Form.FACTORWISE,
        {**_DENSITY, **_SIGNS},
        combine=arithmetic.ties,
    ),
    Method(
        "ties_svd",
        "TIES on the dense deltas, truncated by SVD.",
        RankRule.SVD,
        Form.DELTA_SVD,
        {**_DENSITY, **_SIGNS, **_SVD_PARAMS},
        combine=arithmetic.ties,
    ),
    Method(
        "dare_linear",
        "DARE on the A's and B's: random drop to density, rescale, weighted sum.",
        RankRule.EQUAL,
        Form.FACTORWISE,
        dict(_DENSITY),
        combine=arithmetic.dare_linear,
        random=True,
    ),
    Method(
        "dare_ties",
        "DARE drop and rescale, then TIES sign election on the A's and B's.",
        RankRule.EQUAL,
        Form.FACTORWISE,
        {**_DENSITY, **_SIGNS},
        combine=arithmetic.dare_ties,
        random=True,
    ),
    Method(
        "dare_linear_svd",
        "DARE on the dense deltas, truncated by SVD.",
        RankRule.SVD,
        Form.DELTA_SVD,
        {**_DENSITY, **_SVD_PARAMS},
        combine=arithmetic.dare_linear,
        random=True,
    ),
    Method(
        "dare_ties_svd",
        "DARE and TIES on the dense deltas, truncated by SVD.",
        RankRule.SVD,
        Form.DELTA_SVD,
        {**_DENSITY, **_SIGNS, **_SVD_PARAMS},
        combine=arithmetic.dare_ties,
        random=True,
    ),
    Method(
        "magnitude_prune",
        "Keep the largest values of each A and B (density), weighted sum.",
        RankRule.EQUAL,
        Form.FACTORWISE,
        dict(_DENSITY),
        combine=arithmetic.magnitude_prune,
    ),
    Method(
        "magnitude_prune_svd",
        "Magnitude pruning on the dense deltas, truncated by SVD.",
        RankRule.SVD,
        Form.DELTA_SVD,
        {**_DENSITY, **_SVD_PARAMS},
        combine=arithmetic.magnitude_prune,
    ),
    # Not PEFT's: merged exactly in the inputs' low-rank space (raymerge.merge.engines.lowrank).
    Method(
        "core_ta",
        "Core Space task arithmetic (Panariello et al., NeurIPS 2025): the exact weighted sum.",
        RankRule.SVD,
        Form.LOWRANK,
        dict(_LOWRANK),
        peft=False,
    ),
    Method(
        "core_ties",
        "Core Space TIES: trim, elect and disjoint-mean the R x R cores of the inputs.",
        RankRule.SVD,
        Form.LOWRANK,
        {**_DENSITY, **_LOWRANK},
        peft=False,
    ),
    Method(
        "core_dare",
        "Core Space DARE: random drop (1 - density) and rescale of the cores' entries.",
        RankRule.SVD,
        Form.LOWRANK,
        {**_DENSITY, **_LOWRANK},
        random=True,
        peft=False,
    ),
    Method(
        "knots_ties",
        "KnOTS (Stoica et al., ICLR 2025): TIES on each task's block of one joint SVD.",
        RankRule.SVD,
        Form.LOWRANK,
        {**_DENSITY, **_LOWRANK},
        peft=False,
    ),
    Method(
        "knots_dare_ties",
        "KnOTS-DARE-TIES, as the paper's code: DARE on each task's block of the joint SVD, then "
        "TIES' sign election (by total) and disjoint mean (no magnitude trim).",
        RankRule.SVD,
        Form.LOWRANK,
        {**_DENSITY, **_LOWRANK},
        random=True,
        peft=False,
    ),
    Method(
        "knots_dare_linear",
        "KnOTS with DARE on each task's block of the joint SVD, then a plain sum.",
        RankRule.SVD,
        Form.LOWRANK,
        {**_DENSITY, **_LOWRANK},
        random=True,
        peft=False,
    ),
    Method(
        "tsv",
        "TSV-Merge (Gargiulo et al., CVPR 2025): task singular vectors, decorrelated.",
        RankRule.SVD,
        Form.LOWRANK,
        {"k": 1.0, "k_of": "rank", **_LOWRANK},
        peft=False,
    ),
    Method(
        "iso_c",
        "Iso-C (Marczak et al., ICML 2025): the sum with a flat singular spectrum.",
        RankRule.SVD,
        Form.LOWRANK,
        {"mean_over": "nonzero", **_LOWRANK},
        peft=False,
    ),
)
"""Every combination type, keyed by its name (PEFT's names for PEFT's types)."""


def method(name: str) -> Method:
    """The registry entry for `name`; KeyError with the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(METHODS)
        raise KeyError(f"unknown combination type {name!r}; use one of: {known}") from None


def equal_rank_types() -> list[str]:
    """The types whose inputs must share one rank."""
    return [m.name for m in METHODS.values() if m.rank is RankRule.EQUAL]
