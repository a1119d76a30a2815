"""What a report holds: the ranked rows, their metric columns and how a cell is shown."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raymerge.score.objective import Objective

OBJECTIVE = "objective"
"""The leaderboard's column of each merge's objective value."""
STDERR = "objective_stderr"
"""...and of its standard error."""


@dataclass
class Report:
    rows: list[dict[str, Any]]
    """Leaderboard rows, best first."""
    metrics: list[str]
    """The metric columns (SET.METRIC), in eval-set order."""
    objective: Objective
    csv_uri: str
    html_uri: str
    references: dict[str, Any] | None
    search: dict[str, Any] = field(default_factory=dict)
    """With a search: best objective per number of evaluations, parameter importances."""
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    """The best merge against each reference on the same examples (`verdicts`)."""
    stopped: list[dict[str, Any]] = field(default_factory=list)
    """Merges a race or a pruner stopped early, with their partial scores (`report.race`)."""
    summary: dict[str, Any] | None = None
    """The run's summary.json (the cost of scoring, the race's rounds), if there is one."""

    @property
    def metric(self) -> str:
        return self.objective.name


def metric_columns(lines: list[dict[str, Any]]) -> list[str]:
    """SET.METRIC for every metric the scored lines report (counts left out)."""
    columns: dict[str, None] = {}
    for line in lines:
        for name, values in line["metrics"].items():
            for key in values:
                if key not in ("tokens", "examples") and not key.endswith("_stderr"):
                    columns[f"{name}.{key}"] = None
    return list(columns)


def primary_metrics(columns: list[str]) -> list[str]:
    """One metric per eval set or task: its loss, accuracy, exact match or first metric."""
    preference = {"loss": 0, "accuracy": 1, "exact_match": 2, "acc": 3}
    chosen: dict[str, tuple[int, str]] = {}
    for column in columns:
        name, _, key = column.rpartition(".")
        rank = preference.get(key, len(preference))
        if name not in chosen or rank < chosen[name][0]:
            chosen[name] = (rank, column)
    return [column for _, column in chosen.values()]


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)
