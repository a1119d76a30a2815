"""Racing: score candidates on growing prefixes of one fixed, seeded order of each eval set's
examples, and stop those that are behind. Pure functions over per-example scores (no Ray, no
storage); the driver's side is `cluster.race`.

The order of a set is a permutation seeded by the race's seed and the set's name, so that every
candidate is scored on the same examples in each round (comparisons are paired) and a prefix is
a uniform sample of the set. Two rules decide who goes on after a round:

- `bound` (default): a candidate outside the current top k is stopped when a one-sided test at
  `confidence` says the k-th best beats it on the examples seen: the paired difference of their
  objectives (`stats.compare`) minus z x its standard error is above 0. A candidate as good as
  the k-th best is stopped by one round's test with probability at most 1 - confidence (to
  first order, in the normal approximation); the k-th best of a round is itself chosen by the
  scores, so the guarantee is approximate, and is per test, not over the whole race.
- `halving`: successive halving: keep the best max(k, ceil(n / eta)) after each round, whatever
  the noise. It guarantees the cost (each round scores eta times more examples on about 1/eta of
  the candidates), not the result.

Example:
    >>> prefixes(first=32, growth=2, largest=256)
    [32, 64, 128]
    >>> len(window_positions(example_order(0, "qa", 10), 4, 8))
    4
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from raymerge.score import stats
from raymerge.score.objective import Objective
from raymerge.score.summaries import mean_metrics, text_metrics


def example_order(seed: int, set_name: str, count: int) -> list[int]:
    """The race's order of a set's `count` examples (the same for every candidate)."""
    order = list(range(count))
    random.Random(f"raymerge-race:{seed}:{set_name}").shuffle(order)
    return order


def window_positions(order: list[int], start: int, stop: int) -> list[int]:
    """The examples of positions [start, stop) of `order` (fewer where the set is smaller)."""
    return order[start:stop]


def prefixes(first: int, growth: float, largest: int) -> list[int]:
    """The racing rounds' prefix sizes: `first`, then times `growth`, while under `largest`
    (the largest set's size: the survivors are then scored on everything)."""
    out, size = [], first
    while size < largest:
        out.append(size)
        size = max(size + 1, math.ceil(size * growth))
    return out


def extend(seen: dict[str, dict[str, list]], new: dict[str, dict[str, list]]) -> None:
    """Append a window's per-example scores to those of the earlier windows, set by set."""
    for set_name, columns in new.items():
        into = seen.setdefault(set_name, {key: [] for key in columns})
        for key, values in columns.items():
            into.setdefault(key, []).extend(values)


def in_set_order(
    seed: int,
    sizes: dict[str, int],
    seen: dict[str, dict[str, list]],
    rest: dict[str, dict[str, list]],
) -> dict[str, dict[str, list]]:
    """A race's per-example scores (the prefix it saw, then the rest of the order) put back in
    each set's own order: the same lists as scoring every example in one pass gives."""
    out = {}
    for name, size in sizes.items():
        combined: dict[str, list] = {}
        racing_order = {**seen.get(name, {})}
        for key, values in rest.get(name, {}).items():
            combined[key] = [*racing_order.get(key, []), *values]
        for key, values in racing_order.items():
            combined.setdefault(key, list(values))
        order = example_order(seed, name, size)
        natural = {}
        for key, values in combined.items():
            if len(values) != size:
                raise ValueError(f"eval set {name}: {len(values)} scores for {size} examples")
            column = [None] * size
            for position, value in zip(order, values, strict=True):
                column[position] = value
            natural[key] = column
        out[name] = natural
    return out


def metrics_of(examples: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """Each set's metrics (with their standard errors) on the examples seen so far."""
    out = {}
    for set_name, columns in examples.items():
        if "loglikelihood" in columns:
            out[set_name] = text_metrics(
                columns["loglikelihood"], columns["tokens"], columns["bytes"]
            )
        else:
            kept = {k: v for k, v in columns.items() if k in ("accuracy", "accuracy_norm")}
            out[set_name] = mean_metrics(kept or {"exact_match": columns["exact_match"]})
    return out


def seen_count(examples: dict[str, dict[str, list]]) -> dict[str, int]:
    """Examples scored so far, per set."""
    return {name: len(next(iter(columns.values()), [])) for name, columns in examples.items()}


STEPS_PER_SET = 1_000_000
"""An example's step, for a pruner: its set's index (sorted names) x this + its index."""


def instance_values(
    objective: Objective,
    metrics: dict[str, dict[str, Any]],
    examples: dict[str, dict[str, list]],
    positions: dict[str, list[int]],
) -> list[tuple[int, float]]:
    """(step, value) per example seen, for Optuna's WilcoxonPruner: each example's share of
    the objective (a mean's per-example score; a ratio's numerator over the mean denominator;
    weighted by the objective's coefficients), so that candidates compare example by example.
    `positions` are each set's example indices, in the order of `examples`."""
    names = sorted(positions)
    per_set: dict[str, np.ndarray] = {}
    for metric, coefficient in stats.expanded(objective, metrics):
        name, _, key = metric.rpartition(".")
        if name not in examples:
            continue
        values = _per_example(key, examples[name], metrics[name].get(key, math.nan))
        if values is not None:
            term = coefficient * values
            per_set[name] = per_set[name] + term if name in per_set else term
    out = []
    for name, values in per_set.items():
        base = names.index(name) * STEPS_PER_SET
        out += [(base + i, float(v)) for i, v in zip(positions[name], values, strict=False)]
    return out


def _per_example(metric: str, columns: dict[str, list], value: float) -> np.ndarray | None:
    if "loglikelihood" in columns and metric in stats.RATIOS:
        cols = stats.text_columns(columns)
        num, den = stats.RATIOS[metric]
        return cols[num] / max(float(cols[den].mean()), 1e-12)
    influence = stats.influence(metric, columns, value)
    if influence is None:
        return None
    return influence if metric in columns else value + influence


@dataclass(frozen=True)
class Standing:
    """One candidate after a round: its objective on the examples seen, and how it fared against
    the k-th best (difference oriented so that positive means the k-th best is ahead)."""

    merge_id: str
    objective: float
    behind_by: float | None = None
    stderr: float | None = None


def ranked(objective: Objective, scores: dict[str, tuple[dict, dict]]) -> list[str]:
    """Candidate ids best first (ties by id, so that every run ranks them alike)."""
    return sorted(scores, key=lambda m: (objective.sort_key(objective.value(scores[m][0])), m))


def bound_survivors(
    objective: Objective, scores: dict[str, tuple[dict, dict]], top: int, confidence: float
) -> tuple[list[str], dict[str, Standing]]:
    """The `bound` rule: who goes on, and each candidate's standing against the k-th best."""
    order = ranked(objective, scores)
    if len(order) <= top:
        return order, {m: Standing(m, objective.value(scores[m][0])) for m in order}
    z = NormalDist().inv_cdf(confidence)
    kth = order[top - 1]
    keep, standings = order[:top], {}
    for merge_id in order:
        value = objective.value(scores[merge_id][0])
        if merge_id in order[:top]:
            standings[merge_id] = Standing(merge_id, value)
            continue
        comparison = stats.compare(objective, scores[kth], scores[merge_id])
        standings[merge_id] = Standing(
            merge_id, value, comparison.difference, _finite(comparison.stderr)
        )
        behind = math.isfinite(comparison.stderr) and (
            comparison.difference - z * comparison.stderr > 0
        )
        if not behind:
            keep.append(merge_id)
    return keep, standings


def halving_survivors(
    objective: Objective, scores: dict[str, tuple[dict, dict]], top: int, eta: float
) -> tuple[list[str], dict[str, Standing]]:
    """The `halving` rule: the best max(top, ceil(n / eta)) go on."""
    order = ranked(objective, scores)
    count = max(top, math.ceil(len(order) / eta))
    standings = {}
    for merge_id in order:
        standings[merge_id] = Standing(merge_id, objective.value(scores[merge_id][0]))
    return order[:count], standings


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
