"""The leaderboard and report of a sweep with evaluation, from its manifest (local disk or S3),
ranked by the sweep's objective (or a metric given instead).

Usage (reads the manifest, writes leaderboard.csv and report.html beside it)::

    result = build_report("s3://bucket/sweeps/run-1")
    result.rows[0]["merge_id"], result.html_uri
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from raymerge.errors import InputError
from raymerge.report import page
from raymerge.report.model import OBJECTIVE, Report, metric_columns, primary_metrics
from raymerge.score.objective import MEAN_LOSS, Objective
from raymerge.store import manifest, storage


def leaderboard(
    lines: list[dict[str, Any]], objective: Objective
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per scored merge, best first by `objective`."""
    scored = [line for line in lines if line.get("status") == "done" and line.get("metrics")]
    if not scored:
        raise InputError(
            "no scored merges in this manifest: add `evaluate:` to the spec and run it again"
        )
    columns = metric_columns(scored)
    known = {*columns, MEAN_LOSS}
    unknown = [m for m in objective.metrics() if m not in known]
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r}; use one of: {', '.join(sorted(known))}")
    rows = []
    for line in scored:
        row = {
            "merge_id": line["merge_id"],
            "trial": line.get("trial", ""),
            "adapters": "+".join(a["name"] for a in line["adapters"]),
            "weights": " ".join(f"{w:.3g}" for w in line["weights"]),
            "combination_type": line["combination_type"],
            "params": ",".join(f"{k}={v}" for k, v in line["params"].items() if v is not None),
            "kept": line.get("kept", True),
            OBJECTIVE: round(objective.value(line["metrics"]), 6),
        }
        for column in columns:
            name, _, key = column.rpartition(".")
            row[column] = line["metrics"].get(name, {}).get(key, math.nan)
        if any(c.endswith(".loss") for c in columns):
            row[MEAN_LOSS] = round(Objective.parse(MEAN_LOSS).value(line["metrics"]), 6)
        row["_line"] = line
        rows.append(row)
    rows.sort(key=lambda r: (objective.sort_key(r[OBJECTIVE]), r["merge_id"]))
    return rows, columns


def objective_for(output: str, metric: str | None, storage_options=None) -> Objective:
    """The objective to rank by: `metric` if given, else the sweep's own (evaluation.json),
    else the mean text loss."""
    if metric:
        return Objective.parse(metric)
    evaluation = manifest.read_evaluation(output, storage_options) or {}
    return Objective.parse(evaluation.get("objective") or MEAN_LOSS)


def build_report(
    output: str,
    *,
    out: str | None = None,
    metric: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Report:
    """Write leaderboard.csv and report.html beside the manifest (or into `out`)."""
    lines = manifest.read_manifest(output, storage_options)
    if not lines:
        raise InputError(f"{output} has no {manifest.MANIFEST}: is it a raymerge output?")
    objective = objective_for(output, metric, storage_options)
    if metric and "." not in metric and metric != MEAN_LOSS:  # a set's name: its main metric
        scored = [line for line in lines if line.get("status") == "done" and line.get("metrics")]
        named = [c for c in primary_metrics(metric_columns(scored)) if c.startswith(f"{metric}.")]
        objective = Objective.parse(named[0] if named else metric)
    rows, columns = leaderboard(lines, objective)
    references = manifest.read_references(output, storage_options)
    search = _search_figures(lines, rows, objective)
    target = out or output
    result = Report(
        rows,
        columns,
        objective,
        storage.join(target, "leaderboard.csv"),
        storage.join(target, "report.html"),
        references,
        search,
    )
    storage.write_bytes(result.csv_uri, _csv(rows).encode(), storage_options)
    storage.write_bytes(result.html_uri, page.render(output, result).encode(), storage_options)
    return result


def _search_figures(lines, rows, objective: Objective) -> dict[str, Any]:
    """Best objective after each evaluation, for the search (by trial) and the grid (in the
    manifest's order); parameter importances when the search tried enough merges."""
    by_id = {row["merge_id"]: row[OBJECTIVE] for row in rows}
    trials = sorted(
        (line["trial"], by_id[line["merge_id"]])
        for line in lines
        if line.get("trial") is not None and line["merge_id"] in by_id
    )
    grid = [
        by_id[line["merge_id"]]
        for line in lines
        if line.get("trial") is None and line["merge_id"] in by_id
    ]
    if not trials:
        return {}
    figures: dict[str, Any] = {
        "search_best": _running_best([v for _, v in trials], objective),
        "grid_best": _running_best(grid, objective),
    }
    figures["importances"] = _importances(lines, by_id)
    return figures


def _running_best(values: list[float], objective: Objective) -> list[float]:
    best, out = None, []
    for value in values:
        if not math.isnan(value) and (best is None or objective.better(value, best)):
            best = value
        out.append(best if best is not None else math.nan)
    return out


def _importances(lines, by_id) -> dict[str, float]:
    """Which search parameters mattered (Optuna's fANOVA importance over the trials' recorded
    parameters); empty when Optuna is missing or the trials are too few."""
    trials = [
        (line["search_params"], by_id[line["merge_id"]])
        for line in lines
        if line.get("search_params") and line["merge_id"] in by_id
    ]
    if len(trials) < 8:
        return {}
    try:
        from raymerge.sweep.search import importances
    except ImportError:
        return {}
    return importances(trials)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = ["rank", *(k for k in rows[0] if not k.startswith("_"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **row})
    return buffer.getvalue()
