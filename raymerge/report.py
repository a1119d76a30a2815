"""The leaderboard and report of a sweep with evaluation, from its manifest (local disk or S3).

Usage (reads the manifest, writes leaderboard.csv and report.html beside it)::

    result = build_report("s3://bucket/sweeps/run-1")
    result.rows[0]["merge_id"], result.html_uri
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
from dataclasses import dataclass
from typing import Any

from raymerge import manifest, storage
from raymerge.errors import InputError

MEAN = "mean_loss"


@dataclass
class Report:
    rows: list[dict[str, Any]]
    """Leaderboard rows, best first."""
    eval_sets: list[str]
    metric: str
    csv_uri: str
    html_uri: str
    references: dict[str, Any] | None


def leaderboard(lines: list[dict[str, Any]], metric: str = MEAN) -> tuple[list[dict], list[str]]:
    """One row per scored merge, best (lowest) `metric` first: `mean_loss`, an eval set's name
    (its loss), or `NAME.perplexity`."""
    scored = [line for line in lines if line.get("status") == "done" and line.get("metrics")]
    if not scored:
        raise InputError(
            "no scored merges in this manifest: add `evaluate:` to the spec and run it again"
        )
    eval_sets = sorted({name for line in scored for name in line["metrics"]})
    rows = []
    for line in scored:
        row = {
            "merge_id": line["merge_id"],
            "adapters": "+".join(a["name"] for a in line["adapters"]),
            "weights": " ".join(f"{w:g}" for w in line["weights"]),
            "combination_type": line["combination_type"],
            "params": ",".join(f"{k}={v}" for k, v in line["params"].items() if v is not None),
        }
        for name in eval_sets:
            row[f"{name}.loss"] = line["metrics"][name]["loss"]
            row[f"{name}.perplexity"] = line["metrics"][name]["perplexity"]
        row[MEAN] = round(sum(row[f"{n}.loss"] for n in eval_sets) / len(eval_sets), 6)
        row["_line"] = line
        rows.append(row)
    key = metric if metric == MEAN or "." in metric else f"{metric}.loss"
    if key not in rows[0]:
        choices = ", ".join([MEAN, *eval_sets, *(f"{n}.perplexity" for n in eval_sets)])
        raise InputError(f"unknown metric {metric!r}; use one of: {choices}")
    rows.sort(key=lambda r: (r[key], r["merge_id"]))
    return rows, eval_sets


def build_report(
    output: str,
    *,
    out: str | None = None,
    metric: str = MEAN,
    storage_options: dict[str, Any] | None = None,
) -> Report:
    """Write leaderboard.csv and report.html beside the manifest (or into `out`)."""
    lines = manifest.read_manifest(output, storage_options)
    if not lines:
        raise InputError(f"{output} has no {manifest.MANIFEST}: is it a raymerge output?")
    rows, eval_sets = leaderboard(lines, metric)
    references = manifest.read_references(output, storage_options)
    target = out or output
    csv_uri = storage.join(target, "leaderboard.csv")
    html_uri = storage.join(target, "report.html")
    storage.write_bytes(csv_uri, _csv(rows).encode(), storage_options)
    page = _html(output, rows, eval_sets, metric, references)
    storage.write_bytes(html_uri, page.encode(), storage_options)
    return Report(rows, eval_sets, metric, csv_uri, html_uri, references)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = ["rank", *(k for k in rows[0] if not k.startswith("_"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **row})
    return buffer.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better)."""
    front, best_y = [], float("inf")
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _weight_plots(rows, eval_sets, references) -> str | None:
    """Loss on each eval set against the first adapter's share of the weight, pair by pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs: dict[str, list[dict]] = {}
    for row in rows:
        weights = row["_line"]["weights"]
        if len(weights) == 2 and sum(weights) != 0:
            pairs.setdefault(row["adapters"], []).append(row)
    for pair, members in pairs.items():  # weights summing to 1 make one curve per type
        normalised = [r for r in members if abs(sum(r["_line"]["weights"]) - 1) < 1e-6]
        pairs[pair] = normalised or members
    if not pairs:
        return None
    shown = sorted(pairs)[:6]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, pair in zip(axes[0], shown, strict=False):
        first, second = pair.split("+")
        for color, name in zip(itertools.cycle(colors), eval_sets, strict=False):
            by_type: dict[str, list] = {}
            for row in pairs[pair]:
                weights = row["_line"]["weights"]
                share = weights[0] / sum(weights)
                by_type.setdefault(row["combination_type"], []).append((share, row[f"{name}.loss"]))
            for style, (kind, points) in zip(
                itertools.cycle("o^sDv"), sorted(by_type.items()), strict=False
            ):
                points.sort()
                ax.plot(*zip(*points, strict=True), marker=style, color=color, alpha=0.8,
                        label=f"{name} · {kind}")  # fmt: skip
            if references:
                ax.axhline(references["base"][name]["loss"], color=color, linestyle=":", lw=1)
                for x, adapter in ((1.0, first), (0.0, second)):
                    alone = references["adapters"].get(adapter, {}).get(name)
                    if alone:
                        ax.scatter([x], [alone["loss"]], marker="*", s=140, color=color,
                                   edgecolor="black", zorder=5)  # fmt: skip
        ax.set_title(pair)
        ax.set_xlabel(f"share of weight on {first}")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.01),
               ncol=min(5, len(labels)), fontsize=8)  # fmt: skip
    fig.suptitle("eval loss by eval set and type; dotted: base model; stars: each adapter alone",
                 fontsize=9, y=1.02)  # fmt: skip
    return _figure_png(fig)


def _tradeoff_plot(rows, eval_sets, references) -> str | None:
    """Loss on the first two eval sets, every merge a point, the Pareto front joined."""
    if len(eval_sets) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = eval_sets[:2]
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    points = [(row[f"{a}.loss"], row[f"{b}.loss"]) for row in rows]
    kinds = sorted({row["combination_type"] for row in rows})
    for kind in kinds:
        chosen = [p for p, row in zip(points, rows, strict=True) if row["combination_type"] == kind]
        ax.scatter(*zip(*chosen, strict=True), s=22, alpha=0.7, label=kind)
    front = sorted(points[i] for i in pareto_front(points))
    ax.plot(*zip(*front, strict=True), color="black", lw=1.5, label="Pareto front")
    if references:
        base = references["base"]
        ax.scatter([base[a]["loss"]], [base[b]["loss"]], marker="X", s=120, color="black",
                   label="base model")  # fmt: skip
        for name, scores in references["adapters"].items():
            ax.scatter([scores[a]["loss"]], [scores[b]["loss"]], marker="*", s=160,
                       edgecolor="black", zorder=5)  # fmt: skip
            ax.annotate(f"{name} alone", (scores[a]["loss"], scores[b]["loss"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"loss on {a}")
    ax.set_ylabel(f"loss on {b}")
    ax.set_title(f"Trade-off between {a} and {b} (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _html(output, rows, eval_sets, metric, references) -> str:
    top = rows[:25]
    columns = ["adapters", "weights", "combination_type", "params", MEAN]
    columns += [f"{n}.loss" for n in eval_sets]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", *columns])
    body = "".join(
        "<tr>"
        + f"<td>{rank}</td>"
        + "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in columns)
        + "</tr>"
        for rank, row in enumerate(top, start=1)
    )
    refs = ""
    if references:
        ref_rows = [("base model", references["base"])]
        ref_rows += [(f"{name} alone", s) for name, s in references["adapters"].items()]
        refs = (
            "<h2>References</h2><table><tr><th>model</th>"
            + "".join(f"<th>{html.escape(n)}.loss</th>" for n in eval_sets)
            + "</tr>"
            + "".join(
                f"<tr><td>{html.escape(label)}</td>"
                + "".join(f"<td>{s[n]['loss']:.4f}</td>" for n in eval_sets)
                + "</tr>"
                for label, s in ref_rows
            )
            + "</table>"
        )
    figures = [
        (
            "Loss against the weights, adapter pair by adapter pair",
            _weight_plots(rows, eval_sets, references),
        ),
        ("Trade-off between eval sets", _tradeoff_plot(rows, eval_sets, references)),
    ]
    images = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{png}">'
        for title, png in figures
        if png
    )
    best = rows[0]
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
<p>{len(rows)} scored merges in <code>{html.escape(output)}</code>, ranked by
<b>{html.escape(metric)}</b> (lower is better). Best: <b>{html.escape(best["adapters"])}</b>
with weights {html.escape(best["weights"])}, {html.escape(best["combination_type"])}.</p>
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
