"""What "best" means: one metric, or a weighted sum of metrics across eval sets, each with its
direction. The report, the leaderboard, the CLI and the search all rank by it.

A metric is named `SET.METRIC` (`qa.accuracy`, `sums.loss`, an lm-eval task's `arith.acc`), or
`mean_loss`, the mean loss over the text sets. Losses and perplexities are minimised, everything
else maximised, unless a term says otherwise. One term ranks by that metric as it is; several
rank by the sum of weight x value, each value negated where it is minimised (higher is better).

A sum of terms on different scales (an accuracy in 0..1, a loss of 3..15) is decided by the
widest one; with `normalize: references` (the default for a sum) each term is first taken
relative to the base model's value and divided by its spread across the references (the base
model and each input adapter alone), so that a weight says what share of the ranking it gets:
`(value - base) / (max - min over the references)`. A single term is never rescaled.

Example:
    >>> objective = Objective.parse([{"metric": "qa.accuracy", "weight": 2}, "sums.loss"])
    >>> objective.value({"qa": {"accuracy": 0.5}, "sums": {"loss": 1.25}})
    -0.25
    >>> Objective.parse("sums.loss").better(1.0, 2.0)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MEAN_LOSS = "mean_loss"
MINIMISED = ("loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")


def default_direction(metric: str) -> str:
    last = metric.rsplit(".", 1)[-1]
    return "minimize" if metric == MEAN_LOSS or last in MINIMISED else "maximize"


NORMALIZE = ("references", "none")


@dataclass(frozen=True)
class Term:
    metric: str
    weight: float = 1.0
    direction: str = "maximize"
    offset: float = 0.0
    """Subtracted before scaling (the base model's value, when normalised)."""
    scale: float = 1.0
    """Divides the value (its spread across the references, when normalised)."""

    @property
    def coefficient(self) -> float:
        """What one unit of the metric adds to the objective (negative where minimised)."""
        return self.weight * (1 if self.direction == "maximize" else -1) / self.scale

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        if self.metric == MEAN_LOSS:
            losses = [m["loss"] for m in metrics.values() if "loss" in m]
            return sum(losses) / len(losses) if losses else math.nan
        name, _, key = self.metric.rpartition(".")
        return float(metrics.get(name, {}).get(key, math.nan))


@dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]
    normalize: str = "none"
    """"references": each term of a sum rescaled by the references (see `against`)."""

    @classmethod
    def parse(cls, raw: Any, normalize: str | None = None) -> Objective:
        """From the spec: a metric's name, or a list of names and {metric, weight, direction};
        `normalize` (default: "references" for a sum of terms, "none" for one term)."""
        items = raw if isinstance(raw, list) else [raw]
        terms = []
        for item in items:
            if isinstance(item, str):
                item = {"metric": item}
            metric = item["metric"]
            direction = item.get("direction") or default_direction(metric)
            terms.append(Term(metric, float(item.get("weight", 1.0)), direction))
        objective = cls(tuple(terms))
        if normalize is None:
            normalize = "none" if objective._single else "references"
        return cls(objective.terms, normalize if not objective._single else "none")

    def against(self, references: dict[str, Any] | None) -> Objective:
        """With `normalize: references`, each term relative to the base model's value and in
        units of its spread across the references (base model, each input alone); a term that
        does not vary over them keeps scale 1. Otherwise (or without references) unchanged."""
        if self.normalize != "references" or not references:
            return self
        scored = [references["base"], *references.get("adapters", {}).values()]
        terms = []
        for term in self.terms:
            values = [v for v in (term.value(m) for m in scored) if math.isfinite(v)]
            spread = max(values) - min(values) if values else 0.0
            offset = term.value(references["base"])
            terms.append(
                Term(
                    term.metric,
                    term.weight,
                    term.direction,
                    offset if math.isfinite(offset) else 0.0,
                    spread if spread > 0 else 1.0,
                )
            )
        return Objective(tuple(terms), "applied")

    @property
    def direction(self) -> str:
        """minimize or maximize: a single term keeps its own; a weighted sum is maximised."""
        return self.terms[0].direction if self._single else "maximize"

    @property
    def _single(self) -> bool:
        return len(self.terms) == 1 and self.terms[0].weight == 1.0

    @property
    def name(self) -> str:
        if self._single:
            return self.terms[0].metric
        parts = [
            f"{'+' if t.direction == 'maximize' else '-'}{t.weight:g}*{t.metric}"
            for t in self.terms
        ]
        name = " ".join(parts).lstrip("+")
        return f"{name} (normalised)" if self.normalize != "none" else name

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        """The objective of one merge's (or reference's) metrics; NaN if a metric is missing."""
        if self._single:
            return self.terms[0].value(metrics)
        return sum(t.coefficient * (t.value(metrics) - t.offset) for t in self.terms)

    def better(self, a: float, b: float) -> bool:
        """Whether objective value `a` beats `b`."""
        return a < b if self.direction == "minimize" else a > b

    def sort_key(self, value: float) -> float:
        """Ascending sort puts the best first; a missing value goes last."""
        if math.isnan(value):
            return math.inf
        return value if self.direction == "minimize" else -value

    def metrics(self) -> list[str]:
        return [t.metric for t in self.terms]

    def coefficients(self) -> list[tuple[str, float]]:
        """(metric, what one unit of it adds to the objective) per term: the objective's linear
        form, from which its standard error and paired differences follow (`stats`)."""
        if self._single:
            return [(self.terms[0].metric, 1.0)]
        return [(t.metric, t.coefficient) for t in self.terms]


def scale_warning(objective: Objective) -> str | None:
    """Why a raw sum's ranking may be one term's alone: it adds an unbounded metric (a loss,
    a perplexity) to bounded ones (accuracies, exact match: 0..1) without normalising."""
    if objective.normalize != "none" or objective._single:
        return None
    unbounded = [t.metric for t in objective.terms if default_direction(t.metric) == "minimize"]
    bounded = [t.metric for t in objective.terms if t.metric not in unbounded]
    if not unbounded or not bounded:
        return None
    return (
        f"evaluate.objective adds {', '.join(unbounded)} (unbounded) to {', '.join(bounded)} "
        "(0 to 1) with `normalize: none`: the first may decide the ranking alone; use "
        "`normalize: references` (the default) or weights that put the terms on one scale"
    )


def spread_warning(objective: Objective, references: dict[str, Any]) -> str | None:
    """With the references scored: whether one term's weighted spread across them is more
    than ten times all the others' together (then it alone decides the ranking)."""
    if objective.normalize != "none" or objective._single or not references:
        return None
    scored = [references["base"], *references.get("adapters", {}).values()]
    spreads = {}
    for term in objective.terms:
        values = [v for v in (term.value(m) for m in scored) if math.isfinite(v)]
        if values:
            spreads[term.metric] = abs(term.coefficient) * (max(values) - min(values))
    if len(spreads) < 2:
        return None
    widest = max(spreads, key=spreads.get)
    rest = sum(v for k, v in spreads.items() if k != widest)
    if spreads[widest] <= 10 * rest:
        return None
    return (
        f"the objective's term {widest} varies {spreads[widest]:.3g} across the references, "
        f"the others together {rest:.3g}: it alone decides the ranking; use "
        "`evaluate.normalize: references` or reweight the terms"
    )
