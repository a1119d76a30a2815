"""report.html, one self-contained page: the verdicts (is the best merge better than each
reference?), a leaderboard that fits the page (the objective and each set's main metric with their
standard errors, ties with the top marked; every column one click away and in the CSV), the
references, and the plots."""

from __future__ import annotations

import html
import math
from typing import Any

from raymerge.report.model import OBJECTIVE, Report, cell, primary_metrics
from raymerge.report.plots import (
    CAPTION,
    figure_png,
    importance_plot,
    progress_plot,
    tradeoff_plot,
    weight_plots,
)
from raymerge.report.race import race_html
from raymerge.score.objective import Objective, default_direction

TOP = 25
"""Rows of the leaderboard on the page."""
MAIN_METRICS = 6
"""Metric columns of the main table at most (the rest under "All columns")."""
COLORS = {"better": "#1e8449", "worse": "#c0392b", "not distinguishable": "#7f8c8d"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1340px; }
table { border-collapse: collapse; font-size: 13px; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.merge { max-width: 330px; } .muted { color: #666; font-size: 12px; }
tr.tied td { background: #eef8f0; } tr.top td { font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
ul.verdicts { list-style: none; padding: 0; } ul.verdicts li { margin: 0.3em 0; }
.badge { display: inline-block; min-width: 9.5em; padding: 1px 6px; margin-right: 0.6em;
  border-radius: 3px; color: white; font-size: 12px; text-align: center; }
svg.intervals text { font: 12px system-ui, sans-serif; fill: #333; }
figure { margin: 0.5em 0 1.5em; } figcaption { color: #555; font-size: 13px; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def render(output: str, report: Report) -> str:
    rows, objective = report.rows, report.objective
    shown = primary_metrics(_metrics(report))
    best = rows[0]
    direction = "lower" if objective.direction == "minimize" else "higher"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>raymerge report</title>
<style>{STYLE}</style></head>
<body>
<h1>raymerge report</h1>
<p>{len(rows)} scored merges in <code>{html.escape(output)}</code>, ranked by the objective
<b>{html.escape(objective.name)}</b> ({direction} is better). Best:
<b>{html.escape(best["adapters"])}</b> with weights {html.escape(best["weights"])},
{html.escape(best["combination_type"])}: {_objective_of(best)}.</p>
{_verdicts_html(getattr(report, "verdicts", None) or [])}
{_leaderboard_html(report, shown)}
{_all_columns_html(report)}
{_references_html(report.references, objective, shown)}
{_figures_html(report, shown)}
{race_html(report.stopped, report.summary)}
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


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _objective_of(row: dict[str, Any]) -> str:
    return estimate(row[OBJECTIVE], row.get(f"{OBJECTIVE}_stderr"))


def _metrics(report: Report) -> list[str]:
    """The report's metric columns, standard errors left out (they go beside their metric)."""
    return [c for c in report.metrics if not c.endswith("_stderr")]


def estimate(value: Any, stderr: Any = math.nan) -> str:
    """`value ± stderr`, the standard error to two significant digits and the value to as many
    decimals (at least 3); the value alone where there is no standard error.

    >>> estimate(0.46875, 0.0624), estimate(6.03832, 0.31), estimate(2.5)
    ('0.469 ± 0.062', '6.038 ± 0.31', '2.5000')
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return cell(value)
    value, stderr = float(value), _float(stderr)
    if not (math.isfinite(value) and math.isfinite(stderr)):
        return cell(value)
    if stderr == 0:
        return f"{value:.3f} ± 0"
    digits = min(6, max(0, 1 - math.floor(math.log10(abs(stderr)))))
    return f"{value:.{min(6, max(3, digits))}f} ± {abs(stderr):.{digits}f}"


def _header(column: str, objective: Objective) -> str:
    """A metric's header on two lines (set, metric) with an arrow saying which way is better."""
    direction = objective.direction if column == OBJECTIVE else default_direction(column)
    arrow = "↓" if direction == "minimize" else "↑"
    name, _, key = column.rpartition(".")
    title = f"{html.escape(name)}<br>" if name else ""
    return f'<th title="{html.escape(column)}">{title}{html.escape(key)} {arrow}</th>'


def _main_metrics(report: Report, shown: list[str]) -> list[str]:
    """The main table's metric columns: the objective's own first, at most MAIN_METRICS."""
    wanted = set(report.objective.metrics()) if hasattr(report.objective, "metrics") else set()
    ordered = [c for c in shown if c in wanted] + [c for c in shown if c not in wanted]
    return [c for c in shown if c in ordered[:MAIN_METRICS]]


def _merge_cell(row: dict[str, Any]) -> str:
    params = ", ".join(p for p in str(row.get("params", "")).split(",") if p)
    kind = html.escape(row["combination_type"]) + (f" · {html.escape(params)}" if params else "")
    return (
        f'<td class="merge"><b>{html.escape(row["adapters"])}</b> · '
        f'{html.escape(row["weights"])}<br><span class="muted">{kind}</span></td>'
    )


def _tie_cell(rank: int, tied: Any) -> str:
    if rank == 1:
        return "<td>the top</td>"
    return {True: "<td><b>tied with the top</b></td>", False: '<td class="muted">behind</td>'}.get(
        tied, "<td></td>"
    )


def _leaderboard_html(report: Report, shown: list[str]) -> str:
    rows, objective = report.rows[:TOP], report.objective
    metrics = _main_metrics(report, shown)
    ties = any(row.get("tied") is not None for row in rows)
    head = "<th>#</th><th>merge</th>" + _header(OBJECTIVE, objective)
    head += "<th>vs the top</th>" if ties else ""
    head += "".join(_header(c, objective) for c in metrics)
    body = ""
    for rank, row in enumerate(rows, start=1):
        style = "top" if rank == 1 else "tied" if row.get("tied") is True else ""
        body += f'<tr class="{style}"><td>{rank}</td>' + _merge_cell(row)
        body += f'<td class="num">{_objective_of(row)}</td>'
        body += _tie_cell(rank, row.get("tied")) if ties else ""
        body += "".join(
            f'<td class="num">{estimate(row.get(c, math.nan), row.get(f"{c}_stderr"))}</td>'
            for c in metrics
        )
        body += "</tr>"
    more = len(shown) - len(metrics)
    note = f" {more} more sets' metrics are under All columns." if more > 0 else ""
    return f"""<h2>Leaderboard</h2>
<p class="muted">The top {len(rows)} of {len(report.rows)}, best first: the objective and each
eval set's main metric, ± one standard error; "tied with the top": not statistically
distinguishable from the first.{note}</p>
<div class="scroll"><table class="leaderboard"><tr>{head}</tr>{body}</table></div>"""


def _all_columns_html(report: Report) -> str:
    """Every column of the top rows, in a box that scrolls on its own; the CSV has every row."""
    rows = report.rows[:TOP]
    metrics = [OBJECTIVE, *_metrics(report)]
    if "mean_loss" in rows[0] and "mean_loss" not in metrics:
        metrics.append("mean_loss")
    named = ["merge_id", "trial", "adapters", "weights", "combination_type", "params", "kept"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *named, *metrics])
    body = ""
    for rank, row in enumerate(rows, start=1):
        body += f"<tr><td>{rank}</td>"
        body += "".join(f"<td>{html.escape(cell(row.get(c, '')))}</td>" for c in named)
        body += "".join(
            f'<td class="num">{estimate(row.get(c, math.nan), row.get(f"{c}_stderr"))}</td>'
            for c in metrics
        )
        body += "</tr>"
    return f"""<details><summary>All columns of the top {len(rows)} (every merge, every column:
<a href="leaderboard.csv">leaderboard.csv</a>)</summary>
<div class="scroll"><table class="all-columns"><tr>{head}</tr>{body}</table></div></details>"""


def _verdicts_html(verdicts: list[dict[str, Any]]) -> str:
    """Each verdict's sentence, then the differences with their 95% intervals against 0."""
    if not verdicts:
        return ""
    items = ""
    for verdict in verdicts:
        word = str(verdict.get("verdict", ""))
        color = COLORS.get(word, "#7f8c8d")
        items += (
            f'<li class="verdict"><span class="badge" style="background:{color}">'
            f"{html.escape(word)}</span>{html.escape(str(verdict.get('text', '')))}</li>"
        )
    return f"""<h2>Is the best merge better than the references?</h2>
<ul class="verdicts">{items}</ul>{interval_svg(verdicts)}"""


def _ticks(low: float, high: float) -> list[float]:
    """Round values spread over [low, high] (about five), 0 among them when it lies inside."""
    raw = (high - low) / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step)
    return [round(i * step, 12) for i in range(first, math.floor(high / step) + 1)]


def interval_svg(verdicts: list[dict[str, Any]]) -> str:
    """An inline SVG: per reference, the best merge's difference from it (a dot) and its 95%
    interval (a bar), against a dashed line at 0; right of it, the best merge is better."""
    keys = ("difference", "low", "high")
    drawn = [v for v in verdicts if all(math.isfinite(_float(v.get(k))) for k in keys)]
    if not drawn:
        return ""
    low = min(0.0, *(_float(v["low"]) for v in drawn))
    high = max(0.0, *(_float(v["high"]) for v in drawn))
    pad = (high - low) * 0.08 or 1.0
    low, high = low - pad, high + pad
    width, left, right, row, top = 820, 200, 24, 26, 8
    bottom = top + row * len(drawn)

    def x(value: float) -> float:
        return round(left + (value - low) / (high - low) * (width - left - right), 1)

    parts = [
        f'<line class="zero" x1="{x(0)}" x2="{x(0)}" y1="{top - 4}" y2="{bottom + 4}" '
        'stroke="#888" stroke-dasharray="4 3"/>'
    ]
    for tick in _ticks(low, high):
        parts.append(f'<text x="{x(tick)}" y="{bottom + 20}" text-anchor="middle">{tick:g}</text>')
    for i, verdict in enumerate(drawn):
        y = top + row * i + row / 2
        color = COLORS.get(str(verdict.get("verdict")), "#7f8c8d")
        one, two = x(_float(verdict["low"])), x(_float(verdict["high"]))
        parts.append(
            f'<text x="{left - 10}" y="{y + 4}" text-anchor="end">'
            f"{html.escape(str(verdict.get('reference', '')))}</text>"
            f'<line class="interval" x1="{one}" x2="{two}" y1="{y}" y2="{y}" stroke="{color}" '
            f'stroke-width="3"><title>{html.escape(str(verdict.get("text", "")))}</title></line>'
            f'<line x1="{one}" x2="{one}" y1="{y - 5}" y2="{y + 5}" stroke="{color}"/>'
            f'<line x1="{two}" x2="{two}" y1="{y - 5}" y2="{y + 5}" stroke="{color}"/>'
            f'<circle class="difference" cx="{x(_float(verdict["difference"]))}" cy="{y}" r="4.5" '
            f'fill="{color}"/>'
        )
    parts.append(
        f'<text x="{left}" y="{bottom + 38}">the best merge minus the reference on the objective, '
        "95% interval; right of 0: the best merge is better</text>"
    )
    height = bottom + 46
    return (
        f'<svg class="intervals" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>'
    )


def _figures_html(report: Report, shown: list[str]) -> str:
    """The plots, each under its title, as inline PNGs with their captions."""
    rows, objective = report.rows, report.objective
    figures = [
        (
            "The objective and each set's main metric against the weights, pair by pair",
            weight_plots(rows, shown, objective, report.references),
            f"One panel per metric and adapter pair. {CAPTION}",
        ),
        (
            "Trade-off between two metrics",
            tradeoff_plot(rows, shown, report.references),
            "Every merge a point (±1 standard error); the black line joins the Pareto front.",
        ),
    ]
    if report.search:
        figures.append(
            ("Best objective against evaluations", progress_plot(report.search, objective), "")
        )
        if report.search.get("importances"):
            figures.append(("Which parameters mattered", importance_plot(report.search), ""))
    return "".join(
        f'<h2>{html.escape(title)}</h2><figure><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{figure_png(fig)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for title, fig, caption in figures
        if fig is not None
    )


def _references_html(references, objective: Objective, shown: list[str]) -> str:
    if not references:
        return ""
    rows = [("base model", references.get("base") or {})]
    rows += [(f"{name} alone", s) for name, s in (references.get("adapters") or {}).items()]
    head = "<th>model</th>" + "".join(_header(c, objective) for c in [OBJECTIVE, *shown])
    body = ""
    for label, scores in rows:
        cells = [cell(objective.value(scores))]
        for column in shown:
            name, _, key = column.rpartition(".")
            values = scores.get(name, {})
            cells.append(estimate(values.get(key, math.nan), values.get(f"{key}_stderr")))
        body += f"<tr><td>{html.escape(label)}</td>"
        body += "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"
    return f"""<h2>References</h2>
<p class="muted">The base model and each adapter alone, on the same examples (± one standard
error).</p><div class="scroll"><table><tr>{head}</tr>{body}</table></div>"""
