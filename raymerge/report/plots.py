"""The report's figures (matplotlib, rendered to PNG for a self-contained page).

Each metric has its own panel (a loss and an accuracy never share an axis), points carry ±1
standard-error bars where the scores have them, the best merge is ringed, the references (the base
model, each adapter alone) are drawn and labelled on the panels themselves, and a legend names at
most MAX_LEGEND series: the combination types, the ones past the first few pooled.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from raymerge.report.model import OBJECTIVE
from raymerge.score.objective import Objective, default_direction

MAX_LEGEND = 8
"""The most entries a legend has."""
OTHER = "other types"
"""The legend's pool of the combination types past the first MAX_LEGEND - 1."""
CAPTION = (
    "Error bars: ±1 standard error. Dotted line (shaded: ±1 standard error): the base model; "
    "stars: each adapter alone; red ring: the best merge."
)
MARKERS = "o^sDvP<>"
BEST = "crimson"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scores(scores: dict[str, Any], metric: str) -> float:
    name, _, key = metric.rpartition(".")
    return _float(scores.get(name, {}).get(key, math.nan))


def _stderr(row: dict[str, Any], column: str) -> float:
    """A leaderboard row's standard error of `column` (NaN where the row has none)."""
    return _float(row.get(f"{column}_stderr", math.nan))


def _reference(scores: dict[str, Any], column: str, objective: Objective) -> tuple[float, float]:
    """A reference's value of `column` (a metric or the objective) and its standard error."""
    if column == OBJECTIVE:
        return _float(objective.value(scores)), math.nan
    return _scores(scores, column), _scores(scores, f"{column}_stderr")


def _errors(values) -> list[float] | None:
    values = [_float(v) for v in values]
    return values if any(math.isfinite(v) for v in values) else None


def _better(column: str, objective: Objective) -> str:
    direction = objective.direction if column == OBJECTIVE else default_direction(column)
    return "lower is better" if direction == "minimize" else "higher is better"


def type_groups(rows, limit: int = MAX_LEGEND) -> dict[str, str]:
    """The legend's series of each combination type: the types in the order of their best merge,
    those past the first `limit - 1` pooled as OTHER when there are more than `limit`."""
    kinds = list(dict.fromkeys(row["combination_type"] for row in rows))
    if len(kinds) <= limit:
        return {kind: kind for kind in kinds}
    return {kind: kind if i < limit - 1 else OTHER for i, kind in enumerate(kinds)}


def _styles(groups: dict[str, str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each series, grey for the pool."""
    palette = _pyplot().get_cmap("tab10").colors
    names = list(dict.fromkeys(groups.values()))
    return {
        name: ("#8c8c8c" if name == OTHER else palette[i % 10], MARKERS[i % len(MARKERS)])
        for i, name in enumerate(names)
    }


def _share(row: dict[str, Any]) -> float:
    weights = row["_line"]["weights"]
    return weights[0] / sum(weights) if len(weights) == 2 and sum(weights) else math.nan


def _pairs(rows) -> dict[str, tuple[list[str], list[dict]]]:
    """The two-adapter merges by pair: (the adapters' names, the merges). Where some weightings
    sum to 1, only those: one curve per type."""
    pairs: dict[str, tuple[list[str], list[dict]]] = {}
    for row in rows:
        if math.isfinite(_share(row)):
            names = [a["name"] for a in row["_line"]["adapters"]]
            pairs.setdefault(row["adapters"], (names, []))[1].append(row)
    for pair, (names, members) in pairs.items():
        normalised = [r for r in members if abs(sum(r["_line"]["weights"]) - 1) < 1e-6]
        pairs[pair] = (names, normalised or members)
    return pairs


def weight_plots(rows, metrics: list[str], objective: Objective, references):
    """Small multiples: a row of panels per metric (the objective first), a column per adapter
    pair; in each, the metric against the first adapter's share of the weight, a line per
    combination type with its error bars, the references and the best merge marked."""
    pairs = _pairs(rows)
    if not pairs or not metrics:
        return None
    plt = _pyplot()
    shown = sorted(pairs)[:6]
    columns = [OBJECTIVE, *metrics]
    groups = type_groups(rows)
    styles = _styles(groups)
    fig, axes = plt.subplots(
        len(columns),
        len(shown),
        figsize=(3.7 * len(shown) + 0.8, 2.3 * len(columns) + 0.6),
        squeeze=False,
        sharex=True,
        sharey="row",
    )
    handles: dict[str, Any] = {}
    for i, column in enumerate(columns):
        for j, pair in enumerate(shown):
            ax, (names, members) = axes[i][j], pairs[pair]
            ax.set_label(column)  # which metric the panel shows, for whoever inspects the figure
            _weight_series(ax, members, column, groups, styles, handles)
            _mark_references(ax, references, column, names, objective)
            _mark_best(ax, rows[0], column, pair)
            ax.set_title(f"{pair}: {column}", fontsize=9)
            ax.set_xlim(-0.08, 1.08)
            ax.margins(y=0.15)  # room for the stars' names
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{column}\n({_better(column, objective)})", fontsize=8)
            if i == len(columns) - 1:
                ax.set_xlabel(f"share of weight on {names[0]}", fontsize=8)
    fig.tight_layout(h_pad=1.2)
    _legends(fig, handles, list(styles), references)
    return fig


def _legends(fig, handles: dict[str, Any], order: list[str], references) -> None:
    """Above the panels: the series (the combination types), then the key to the marks."""
    from matplotlib.lines import Line2D

    order = [name for name in order if name in handles]
    row = 0.32 / fig.get_figheight()  # one legend row, in figure height
    fig.legend([handles[n] for n in order], order, loc="lower center", ncol=len(order),
               bbox_to_anchor=(0.5, 1.0 + row), fontsize=9, frameon=False)  # fmt: skip
    key = [Line2D([], [], marker="o", ms=11, mfc="none", mec=BEST, mew=2, ls="none")]
    labels = ["the best merge"]
    if references:
        key += [
            Line2D([], [], color="black", ls=":", lw=1.2),
            Line2D([], [], marker="*", ms=12, mfc="gold", mec="black", ls="none"),
        ]
        labels += ["the base model (shaded: ±1 standard error)", "an adapter alone (named)"]
    fig.legend(key, labels, loc="lower center", ncol=len(key), bbox_to_anchor=(0.5, 1.0),
               fontsize=8, frameon=False)  # fmt: skip
    fig.text(0.5, -0.005, CAPTION, ha="center", va="top", fontsize=8)


def _weight_series(ax, members, column, groups, styles, handles) -> None:
    by_type: dict[str, list] = {}
    for row in members:
        point = (_share(row), _float(row.get(column)), _stderr(row, column))
        by_type.setdefault(row["combination_type"], []).append(point)
    for kind, points in sorted(by_type.items()):
        points.sort()
        xs, ys, errors = zip(*points, strict=True)
        group = groups.get(kind, OTHER)
        color, marker = styles[group]
        drawn = ax.errorbar(xs, ys, yerr=_errors(errors), color=color, marker=marker, ms=4,
                            lw=1.2, capsize=2, elinewidth=0.8, alpha=0.85)  # fmt: skip
        handles.setdefault(group, drawn)


def _mark_references(ax, references, column: str, names: list[str], objective) -> None:
    """The base model as a dotted line (its ±1 standard error shaded; the key names it), each
    adapter alone as a star where the whole weight is on it, named."""
    if not references:
        return
    value, error = _reference(references.get("base") or {}, column, objective)
    if math.isfinite(value):
        ax.axhline(value, color="black", linestyle=":", lw=1.2, zorder=1)
        if math.isfinite(error):
            ax.axhspan(value - error, value + error, color="black", alpha=0.07, lw=0, zorder=0)
    for x, name in zip((1.0, 0.0), names, strict=False):
        alone = (references.get("adapters") or {}).get(name)
        value, error = _reference(alone, column, objective) if alone else (math.nan, math.nan)
        if not math.isfinite(value):
            continue
        ax.errorbar([x], [value], yerr=_errors([error]), marker="*", ms=13, mfc="gold",
                    mec="black", color="black", capsize=3, linestyle="none", zorder=5)  # fmt: skip
        ax.annotate(f"{name} alone", (x, value), xytext=(-6 if x else 6, 6), fontsize=7,
                    textcoords="offset points", ha="right" if x else "left")  # fmt: skip


def _mark_best(ax, best: dict[str, Any], column: str, pair: str) -> None:
    share, value = _share(best), _float(best.get(column))
    if best["adapters"] != pair or not (math.isfinite(share) and math.isfinite(value)):
        return
    ax.scatter([share], [value], s=190, facecolors="none", edgecolors=BEST, linewidths=2,
               zorder=6)  # fmt: skip


def tradeoff_plot(rows, metrics: list[str], references):
    """The first two metrics, every merge a point with its error bars, the Pareto front joined,
    the best merge ringed and the references labelled."""
    from raymerge.report.pareto import pareto_front

    if len(metrics) < 2:
        return None
    plt = _pyplot()
    a, b = metrics[:2]
    directions = (default_direction(a), default_direction(b))
    groups = type_groups(rows, MAX_LEGEND - 1)  # and the Pareto front
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    for group, (color, marker) in _styles(groups).items():
        chosen = [row for row in rows if groups[row["combination_type"]] == group]
        ax.errorbar([_float(r[a]) for r in chosen], [_float(r[b]) for r in chosen],
                    xerr=_errors(_stderr(r, a) for r in chosen),
                    yerr=_errors(_stderr(r, b) for r in chosen), linestyle="none",
                    marker=marker, ms=4.5, color=color, alpha=0.75, elinewidth=0.6,
                    label=group)  # fmt: skip
    points = [(_float(row[a]), _float(row[b])) for row in rows]
    front = sorted(points[i] for i in pareto_front(points, directions))
    ax.plot(*zip(*front, strict=True), color="black", lw=1.5, label="Pareto front")
    ax.scatter(*([v] for v in points[0]), s=200, facecolors="none", edgecolors=BEST,
               linewidths=2, zorder=6)  # fmt: skip
    ax.annotate("best", points[0], xytext=(8, -12), textcoords="offset points", color=BEST,
                fontsize=8, fontweight="bold")  # fmt: skip
    _tradeoff_references(ax, references, a, b)
    ax.set_xlabel(f"{a} ({'lower' if directions[0] == 'minimize' else 'higher'} is better)")
    ax.set_ylabel(f"{b} ({'lower' if directions[1] == 'minimize' else 'higher'} is better)")
    ax.set_title(f"Trade-off between {a} and {b}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.text(0.5, -0.01, "Error bars: ±1 standard error.", ha="center", va="top", fontsize=8)
    return fig


def _tradeoff_references(ax, references, a: str, b: str) -> None:
    if not references:
        return
    marked = [("base model", references.get("base") or {}, "X")]
    marked += [(f"{n} alone", s, "*") for n, s in (references.get("adapters") or {}).items()]
    for label, scores, marker in marked:
        x, y = _scores(scores, a), _scores(scores, b)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        ax.errorbar([x], [y], xerr=_errors([_scores(scores, f"{a}_stderr")]),
                    yerr=_errors([_scores(scores, f"{b}_stderr")]), marker=marker, ms=12,
                    mfc="gold" if marker == "*" else "black", mec="black", color="black",
                    linestyle="none", capsize=3, zorder=5)  # fmt: skip
        ax.annotate(label, (x, y), fontsize=8, xytext=(6, 5), textcoords="offset points")


def progress_plot(search: dict[str, Any], objective: Objective):
    """Best objective reached after n evaluations: the search against the grid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, values in (("search", search["search_best"]), ("grid", search["grid_best"])):
        if values:
            ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"best {objective.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def importance_plot(search: dict[str, Any]):
    plt = _pyplot()
    items = sorted(search["importances"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    return fig
