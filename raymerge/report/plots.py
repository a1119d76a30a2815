"""The report's figures (matplotlib, rendered to PNG for a self-contained page)."""

from __future__ import annotations

import base64
import io
import itertools
import math
from typing import Any

from raymerge.score.objective import Objective, default_direction


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


def _scores(scores: dict[str, Any], metric: str) -> float:
    name, _, key = metric.rpartition(".")
    return float(scores.get(name, {}).get(key, math.nan))


def weight_plots(rows, metrics: list[str], objective: Objective, references):
    """Each set's main metric against the first adapter's share of the weight, pair by pair."""
    pairs: dict[str, list[dict]] = {}
    for row in rows:
        weights = row["_line"]["weights"]
        if len(weights) == 2 and sum(weights) != 0:
            pairs.setdefault(row["adapters"], []).append(row)
    for pair, members in pairs.items():  # weights summing to 1 make one curve per type
        normalised = [r for r in members if abs(sum(r["_line"]["weights"]) - 1) < 1e-6]
        pairs[pair] = normalised or members
    if not pairs or not metrics:
        return None
    plt = _pyplot()
    shown = sorted(pairs)[:6]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, pair in zip(axes[0], shown, strict=False):
        first, second = pair.split("+")
        for color, metric in zip(itertools.cycle(colors), metrics, strict=False):
            by_type: dict[str, list] = {}
            for row in pairs[pair]:
                weights = row["_line"]["weights"]
                share = weights[0] / sum(weights)
                by_type.setdefault(row["combination_type"], []).append((share, row[metric]))
            for style, (kind, points) in zip(
                itertools.cycle("o^sDv"), sorted(by_type.items()), strict=False
            ):
                points.sort()
                ax.plot(*zip(*points, strict=True), marker=style, color=color, alpha=0.8,
                        label=f"{metric} · {kind}")  # fmt: skip
            if references:
                ax.axhline(_scores(references["base"], metric), color=color, linestyle=":", lw=1)
                for x, adapter in ((1.0, first), (0.0, second)):
                    alone = references["adapters"].get(adapter)
                    if alone:
                        ax.scatter([x], [_scores(alone, metric)], marker="*", s=140, color=color,
                                   edgecolor="black", zorder=5)  # fmt: skip
        ax.set_title(pair)
        ax.set_xlabel(f"share of weight on {first}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.01),
               ncol=min(4, len(labels)), fontsize=8)  # fmt: skip
    fig.suptitle("metric by eval set and type; dotted: base model; stars: each adapter alone",
                 fontsize=9, y=1.02)  # fmt: skip
    return fig


def tradeoff_plot(rows, metrics: list[str], references):
    """The first two metrics, every merge a point, the Pareto front joined."""
    from raymerge.report.pareto import pareto_front

    if len(metrics) < 2:
        return None
    plt = _pyplot()
    a, b = metrics[:2]
    directions = (default_direction(a), default_direction(b))
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    points = [(row[a], row[b]) for row in rows]
    for kind in sorted({row["combination_type"] for row in rows}):
        chosen = [p for p, row in zip(points, rows, strict=True) if row["combination_type"] == kind]
        ax.scatter(*zip(*chosen, strict=True), s=22, alpha=0.7, label=kind)
    front = sorted(points[i] for i in pareto_front(points, directions))
    ax.plot(*zip(*front, strict=True), color="black", lw=1.5, label="Pareto front")
    if references:
        base = references["base"]
        ax.scatter([_scores(base, a)], [_scores(base, b)], marker="X", s=120, color="black",
                   label="base model")  # fmt: skip
        for name, scores in references["adapters"].items():
            point = (_scores(scores, a), _scores(scores, b))
            ax.scatter(*([v] for v in point), marker="*", s=160, edgecolor="black", zorder=5)
            ax.annotate(f"{name} alone", point, fontsize=8, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"{a} ({'lower' if directions[0] == 'minimize' else 'higher'} is better)")
    ax.set_ylabel(f"{b} ({'lower' if directions[1] == 'minimize' else 'higher'} is better)")
    ax.set_title(f"Trade-off between {a} and {b}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


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
