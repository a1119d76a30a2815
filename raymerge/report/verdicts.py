"""Whether the differences a leaderboard shows are real: the best merge against each reference
(the base model, every input alone) and against the merges just below it, each pair compared on
the same examples (`score.stats.compare`: the paired difference's 95% interval).

A verdict is "better" or "worse" when the interval excludes zero, else "not distinguishable with
N examples", with roughly how many examples per set would tell the two apart at the same spread.
"""

from __future__ import annotations

import math
from typing import Any

from raymerge.score import stats
from raymerge.score.objective import Objective

TIE_ROWS = 20
"""Leaderboard rows checked for a statistical tie with the top one (their merge.json is read)."""


def describe(comparison: stats.Comparison, what: str, against: str) -> str:
    """One sentence: `what` against `against`, with the interval and the verdict."""
    interval = f"{comparison.difference:+.4f} (95% interval {comparison.low:+.4f} to "
    interval += f"{comparison.high:+.4f})"
    verdict = comparison.verdict
    if verdict in ("better", "worse"):
        return f"{what} is {verdict} than {against}: {interval}."
    if verdict == "unknown":
        return f"{what} against {against}: {comparison.difference:+.4f}, no error bar known."
    text = (
        f"{what} and {against} are not distinguishable with {comparison.examples} examples "
        f"per set: {interval}"
    )
    needed = comparison.examples_needed
    if needed is not None:
        text += f"; about {needed} examples per set would tell them apart"
    return text + "."


def reference_verdicts(
    objective: Objective, best: dict[str, Any] | None, references: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The best merge (its merge.json record) against each reference, on the same examples."""
    if not best or not references or "metrics" not in best:
        return []
    examples = references.get("examples", {})
    scored = [("base model", references["base"], examples.get("base", {}))]
    scored += [
        (f"{name} alone", metrics, examples.get("adapters", {}).get(name, {}))
        for name, metrics in references.get("adapters", {}).items()
    ]
    out = []
    for label, metrics, per_example in scored:
        comparison = stats.compare(
            objective, (best["metrics"], best.get("examples", {})), (metrics, per_example)
        )
        out.append(
            {
                "reference": label,
                "objective": objective.value(metrics),
                "objective_stderr": stats.objective_stderr(objective, metrics, per_example),
                "difference": comparison.difference,
                "low": comparison.low,
                "high": comparison.high,
                "verdict": comparison.verdict,
                "examples": comparison.examples,
                "examples_needed": comparison.examples_needed,
                "text": describe(comparison, "the best merge", label),
            }
        )
    return out


def mark_ties(rows: list[dict[str, Any]], records: dict[str, dict], objective: Objective) -> None:
    """Set each row's `tied` (with the top row: True, False, or None where a record is
    missing) and, where its record holds per-example scores, its exact `objective_stderr`."""
    top = records.get(rows[0]["merge_id"]) if rows else None
    for index, row in enumerate(rows):
        record = records.get(row["merge_id"])
        row.setdefault("tied", None)
        if record is None or "metrics" not in record:
            continue
        per_example = record.get("examples", {})
        if per_example:
            row["objective_stderr"] = stats.objective_stderr(
                objective, record["metrics"], per_example
            )
        if index == 0:
            row["tied"] = True
        elif top is not None and per_example:
            comparison = stats.compare(
                objective,
                (top["metrics"], top.get("examples", {})),
                (record["metrics"], per_example),
            )
            row["tied"] = comparison.verdict == "not distinguishable"


def line_objective_stderr(objective: Objective, metrics: dict[str, Any]) -> float:
    """The objective's stderr from its metrics' own stderrs (terms taken as independent), for
    rows whose per-example scores are not read."""
    variance = 0.0
    for metric, coefficient in stats.expanded(objective, metrics):
        name, _, key = metric.rpartition(".")
        stderr = metrics.get(name, {}).get(f"{key}_stderr")
        if not isinstance(stderr, int | float):
            return math.nan
        variance += (coefficient * stderr) ** 2
    return math.sqrt(variance)
