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
from raymerge.report.model import OBJECTIVE, STDERR, Report, metric_columns, primary_metrics
from raymerge.report.race import stopped_rows
from raymerge.report.verdicts import (
    TIE_ROWS,
    line_objective_stderr,
    mark_ties,
    reference_verdicts,
)
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
            STDERR: _objective_stderr(line, objective),
        }
        for column in columns:
            name, _, key = column.rpartition(".")
            values = line["metrics"].get(name, {})
            row[column] = values.get(key, math.nan)
            stderr = values.get(f"{key}_stderr")
            row[f"{column}_stderr"] = stderr if isinstance(stderr, int | float) else math.nan
        if any(c.endswith(".loss") for c in columns):
            row[MEAN_LOSS] = round(Objective.parse(MEAN_LOSS).value(line["metrics"]), 6)
        row["_line"] = line
        rows.append(row)
    rows.sort(key=lambda r: (objective.sort_key(r[OBJECTIVE]), r["merge_id"]))
    return rows, columns


def _objective_stderr(line: dict[str, Any], objective: Objective) -> float:
    """The sweep's own objective's stderr as the driver recorded it (from per-example scores),
    else one from the metrics' stderrs (terms taken as independent)."""
    recorded, value = line.get(STDERR), line.get(OBJECTIVE)
    same = isinstance(value, int | float) and abs(value - objective.value(line["metrics"])) < 1e-6
    if same and isinstance(recorded, int | float):  # the objective the driver ranked by
        return recorded
    return round(line_objective_stderr(objective, line["metrics"]), 6)


def _records(output: str, merge_ids: list[str], storage_options) -> dict[str, dict]:
    """The merge.json of the top rows (per-example scores: ties and verdicts); none if they
    cannot be read (the leaderboard stands without them)."""
    try:
        records = manifest.read_records(output, merge_ids, storage_options)
        return {record["merge_id"]: record for record in records}
    except (*storage.errors(), ValueError, KeyError):
        return {}


def objective_for(
    output: str, metric: str | None, storage_options=None, references=None
) -> Objective:
    """The objective to rank by: `metric` if given, else the sweep's own (evaluation.json),
    else the mean text loss; normalised by the references where the sweep's is."""
    if metric:
        return Objective.parse(metric)
    evaluation = manifest.read_evaluation(output, storage_options) or {}
    normalize = evaluation.get("normalize", "none")  # outputs from before it: raw sums
    return Objective.parse(evaluation.get("objective") or MEAN_LOSS, normalize).against(references)


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
    references = manifest.read_references(output, storage_options)
    objective = objective_for(output, metric, storage_options, references)
    if metric and "." not in metric and metric != MEAN_LOSS:  # a set's name: its main metric
        scored = [line for line in lines if line.get("status") == "done" and line.get("metrics")]
        named = [c for c in primary_metrics(metric_columns(scored)) if c.startswith(f"{metric}.")]
        objective = Objective.parse(named[0] if named else metric)
    rows, columns = leaderboard(lines, objective)
    records = _records(output, [row["merge_id"] for row in rows[:TIE_ROWS]], storage_options)
    mark_ties(rows, records, objective)
    verdicts = reference_verdicts(objective, records.get(rows[0]["merge_id"]), references)
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
        verdicts,
        stopped_rows(lines, objective),
        _summary(output, storage_options),
    )
    csv_text = _csv(rows, result.stopped)
    storage.write_bytes(result.csv_uri, csv_text.encode(), storage_options)
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


def _summary(output: str, storage_options) -> dict[str, Any] | None:
    try:
        return manifest.read_summary(output, storage_options)
    except (*storage.errors(), ValueError):
        return None


def _csv(rows: list[dict[str, Any]], stopped: list[dict[str, Any]] = ()) -> str:
    """The scored merges ranked, then (with a `status` column) those stopped early."""
    buffer = io.StringIO()
    columns = ["rank", *(k for k in rows[0] if not k.startswith("_"))]
    if stopped:
        columns += ["status", "examples_seen", "behind_by", "behind_stderr"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **row, **({"status": "done"} if stopped else {})})
    for row in stopped:
        writer.writerow({"rank": "", **row})
    return buffer.getvalue()
