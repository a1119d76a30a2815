"""The leaderboard and report of a sweep with evaluation, from its manifest (local disk or S3),
ranked by the sweep's objective (or a metric given instead).

Usage (reads the manifest, writes leaderboard.csv and report.html beside it)::

    result = build_report("s3://bucket/sweeps/run-1")
    result.rows[0]["merge_id"], result.html_uri
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

from raymerge.errors import InputError
from raymerge.report.plots import (
    figure_png,
    importance_plot,
    progress_plot,
    tradeoff_plot,
    weight_plots,
)
from raymerge.score.objective import MEAN_LOSS, Objective
from raymerge.store import manifest, storage

OBJECTIVE = "objective"


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

    @property
    def metric(self) -> str:
        return self.objective.name


def metric_columns(lines: list[dict[str, Any]]) -> list[str]:
    """SET.METRIC for every metric the scored lines report (counts left out)."""
    columns: dict[str, None] = {}
    for line in lines:
        for name, values in line["metrics"].items():
            for key in values:
                if key not in ("tokens", "examples"):
                    columns[f"{name}.{key}"] = None
    return list(columns)


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
    storage.write_bytes(result.html_uri, _html(output, result).encode(), storage_options)
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


def pareto_front(points: list[tuple[float, float]], directions=("minimize", "minimize")):
    """Indices of the points no other point beats on both coordinates."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    keyed = [(p[0] * signs[0], p[1] * signs[1]) for p in points]
    front, best_y = [], math.inf
    for i in sorted(range(len(keyed)), key=lambda i: keyed[i]):
        if keyed[i][1] < best_y:
            front.append(i)
            best_y = keyed[i][1]
    return front


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


def _html(output: str, report: Report) -> str:
    rows, objective = report.rows, report.objective
    shown = primary_metrics(report.metrics)
    top = rows[:25]
    columns = ["adapters", "weights", "combination_type", "params", OBJECTIVE, *shown]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *columns])
    body = "".join(
        "<tr>"
        + f"<td>{rank}</td>"
        + "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in columns)
        + "</tr>"
        for rank, row in enumerate(top, start=1)
    )
    refs = _references_html(report.references, objective, shown)
    figures = [
        (
            "The objective and each set's main metric against the weights, pair by pair",
            weight_plots(rows, shown, objective, report.references),
        ),
        ("Trade-off between two metrics", tradeoff_plot(rows, shown, report.references)),
    ]
    if report.search:
        figures.append(
            ("Best objective against evaluations", progress_plot(report.search, objective))
        )
        if report.search.get("importances"):
            figures.append(("Which parameters mattered", importance_plot(report.search)))
    images = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{figure_png(fig)}">'
        for title, fig in figures
        if fig is not None
    )
    best = rows[0]
    direction = "lower" if objective.direction == "minimize" else "higher"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>raymerge report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f3f3; }} tr:first-child td {{ font-weight: 600; }}
img {{ max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }}
</style></head>
<body>
<h1>raymerge report</h1>
<p>{len(rows)} scored merges in <code>{html.escape(output)}</code>, ranked by the objective
<b>{html.escape(objective.name)}</b> ({direction} is better). Best:
<b>{html.escape(best["adapters"])}</b> with weights {html.escape(best["weights"])},
{html.escape(best["combination_type"])}: {_cell(best[OBJECTIVE])}.</p>
<h2>Leaderboard</h2><table><tr>{head}</tr>{body}</table>
{refs}
{images}
<script>
// For headless checks: the title says how many images decoded.
window.addEventListener("load", () => {{
  const images = [...document.images];
  const shown = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = `raymerge report (${{shown}}/${{images.length}} images)`;
}});
</script>
</body></html>
"""


def _references_html(references, objective: Objective, shown: list[str]) -> str:
    if not references:
        return ""
    rows = [("base model", references["base"])]
    rows += [(f"{name} alone", s) for name, s in references["adapters"].items()]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", OBJECTIVE, *shown])
    body = ""
    for label, scores in rows:
        cells = [_cell(objective.value(scores))]
        for column in shown:
            name, _, key = column.rpartition(".")
            cells.append(_cell(scores.get(name, {}).get(key, math.nan)))
        body += f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells)
        body += "</tr>"
    return f"<h2>References</h2><table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)
