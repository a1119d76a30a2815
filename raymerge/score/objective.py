"""What "best" means: one metric, or a weighted sum of metrics across eval sets, each with its
direction. The report, the leaderboard, the CLI and the search all rank by it.

A metric is named `SET.METRIC` (`qa.accuracy`, `sums.loss`, an lm-eval task's `arith.acc`), or
`mean_loss`, the mean loss over the text sets. Losses and perplexities are minimised, everything
else maximised, unless a term says otherwise. One term ranks by that metric as it is; several
rank by the sum of weight x value, each value negated where it is minimised (higher is better).

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


@dataclass(frozen=True)
class Term:
    metric: str
    weight: float = 1.0
    direction: str = "maximize"

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        if self.metric == MEAN_LOSS:
            losses = [m["loss"] for m in metrics.values() if "loss" in m]
            return sum(losses) / len(losses) if losses else math.nan
        name, _, key = self.metric.rpartition(".")
        return float(metrics.get(name, {}).get(key, math.nan))


@dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, raw: Any) -> Objective:
        """From the spec: a metric's name, or a list of names and {metric, weight, direction}."""
        items = raw if isinstance(raw, list) else [raw]
        terms = []
        for item in items:
            if isinstance(item, str):
                item = {"metric": item}
            metric = item["metric"]
            direction = item.get("direction") or default_direction(metric)
            terms.append(Term(metric, float(item.get("weight", 1.0)), direction))
        return cls(tuple(terms))

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
        return " ".join(parts).lstrip("+")

    def value(self, metrics: dict[str, dict[str, float]]) -> float:
        """The objective of one merge's (or reference's) metrics; NaN if a metric is missing."""
        if self._single:
            return self.terms[0].value(metrics)
        return sum(
            t.weight * t.value(metrics) * (1 if t.direction == "maximize" else -1)
            for t in self.terms
        )

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
