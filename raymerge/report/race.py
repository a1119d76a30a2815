"""The merges a race or a search's pruner stopped, for the leaderboard (as such: after the scored
ones, with their partial scores) and the report (which round stopped which merge, how far behind
the k-th best it was, with its interval), and the cost of scoring against scoring everything.

Example:
    >>> cost_line({"examples_scored": 250, "examples_if_full": 1000, "stopped": 30})[:48]
    'last run: 30 merges stopped early; 250 of 1,000 '
"""

from __future__ import annotations

import html
import math
from typing import Any

from raymerge.report.model import OBJECTIVE, STDERR
from raymerge.score.objective import Objective
from raymerge.score.stats import Z95

SHOWN = 40
"""Stopped merges listed in the report (all of them are in the CSV)."""


def stopped_rows(lines: list[dict[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """One row per stopped merge, in the leaderboard's columns where it has them: the
    objective on the examples it saw, where it stopped, and how far behind it was."""
    rows = []
    for line in lines:
        if line.get("status") != "stopped":
            continue
        standing = line.get("standing") or {}
        value = objective.value(line.get("metrics") or {})
        same = isinstance(line.get(OBJECTIVE), int | float) and abs(value - line[OBJECTIVE]) < 1e-6
        partial = {
            f"{name}.{key}": value
            for name, values in (line.get("metrics") or {}).items()
            for key, value in values.items()
            if key not in ("tokens", "examples")
        }
        rows.append(
            {
                **partial,
                "merge_id": line["merge_id"],
                "trial": line.get("trial", ""),
                "adapters": "+".join(a["name"] for a in line["adapters"]),
                "weights": " ".join(f"{w:.3g}" for w in line["weights"]),
                "combination_type": line["combination_type"],
                "params": ",".join(f"{k}={v}" for k, v in line["params"].items() if v is not None),
                "kept": False,
                OBJECTIVE: round(value, 6),
                STDERR: line.get(STDERR) if same else math.nan,
                "status": f"stopped ({line.get('stopped')}, round {line.get('round')})",
                "examples_seen": sum((line.get("examples_seen") or {}).values()),
                "behind_by": standing.get("behind_by"),
                "behind_stderr": standing.get("stderr"),
                "round": line.get("round"),
            }
        )
    rows.sort(key=lambda r: (r["round"] or 0, objective.sort_key(r[OBJECTIVE]), r["merge_id"]))
    return rows


def cost_line(summary: dict[str, Any] | None) -> str | None:
    """What scoring cost against scoring every merge on every example (None: no figures)."""
    if not summary or not summary.get("examples_if_full"):
        return None
    scored, full = summary["examples_scored"], summary["examples_if_full"]
    return (
        f"last run: {summary.get('stopped', 0)} merges stopped early; {scored:,} of {full:,} "
        f"example scorings ({100 * scored / full:.1f}% of scoring every merge fully)"
    )


def race_html(rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    """The report's race section: the rounds, and the stopped merges with their intervals."""
    if not rows:
        return ""
    parts = ["<h2>Stopped early</h2>"]
    line = cost_line(summary)
    if line:
        parts.append(f"<p>{html.escape(line)}.</p>")
    rounds = (summary or {}).get("race") or []
    if rounds:
        parts.append(
            "<table><tr><th>round</th><th>examples per set</th><th>merges</th><th>stopped</th></tr>"
        )
        for index, figures in enumerate(rounds, start=1):
            parts.append(
                f"<tr><td>{index}</td><td>{figures['prefix']}</td>"
                f"<td>{figures['candidates']}</td><td>{figures['stopped']}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<table><tr><th>merge</th><th>stopped</th><th>examples seen</th><th>objective there</th>"
        "<th>behind the k-th best (95% interval)</th></tr>"
    )
    for row in rows[:SHOWN]:
        merge = f"{row['adapters']} {row['combination_type']} {row['weights']}"
        parts.append(
            f"<tr><td>{html.escape(merge)}</td><td>{html.escape(row['status'])}</td>"
            f"<td>{row['examples_seen']}</td><td>{_number(row[OBJECTIVE])}</td>"
            f"<td>{_interval(row['behind_by'], row['behind_stderr'])}</td></tr>"
        )
    parts.append("</table>")
    if len(rows) > SHOWN:
        parts.append(f"<p>{len(rows) - SHOWN} more in leaderboard.csv.</p>")
    return "\n".join(parts)


def _interval(difference: Any, stderr: Any) -> str:
    if not isinstance(difference, int | float):
        return ""
    if not isinstance(stderr, int | float):
        return _number(difference)
    low, high = difference - Z95 * stderr, difference + Z95 * stderr
    return f"{difference:.3f} ({low:.3f} to {high:.3f})"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"
