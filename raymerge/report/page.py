"""report.html: the leaderboard's top, the references and the plots, in one self-contained page."""

from __future__ import annotations

import html
import math

from raymerge.report.model import OBJECTIVE, Report, cell, primary_metrics
from raymerge.report.plots import (
    figure_png,
    importance_plot,
    progress_plot,
    tradeoff_plot,
    weight_plots,
)
from raymerge.score.objective import Objective


def render(output: str, report: Report) -> str:
    rows, objective = report.rows, report.objective
    shown = primary_metrics(report.metrics)
    top = rows[:25]
    columns = ["adapters", "weights", "combination_type", "params", OBJECTIVE, *shown]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *columns])
    body = "".join(
        "<tr>"
        + f"<td>{rank}</td>"
        + "".join(f"<td>{html.escape(cell(row[c]))}</td>" for c in columns)
        + "</tr>"
        for rank, row in enumerate(top, start=1)
    )
    refs = _references_html(report.references, objective, shown)
    images = _figures_html(report, shown)
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
{html.escape(best["combination_type"])}: {cell(best[OBJECTIVE])}.</p>
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


def _figures_html(report: Report, shown: list[str]) -> str:
    """The plots, each under its title, as inline PNGs."""
    rows, objective = report.rows, report.objective
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
    return images


def _references_html(references, objective: Objective, shown: list[str]) -> str:
    if not references:
        return ""
    rows = [("base model", references["base"])]
    rows += [(f"{name} alone", s) for name, s in references["adapters"].items()]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", OBJECTIVE, *shown])
    body = ""
    for label, scores in rows:
        cells = [cell(objective.value(scores))]
        for column in shown:
            name, _, key = column.rpartition(".")
            cells.append(cell(scores.get(name, {}).get(key, math.nan)))
        body += f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells)
        body += "</tr>"
    return f"<h2>References</h2><table><tr>{head}</tr>{body}</table>"
