"""report.html and its figures, from a report built by hand: each metric on its own axes (a loss
and an accuracy never share one), error bars, the best merge and the references marked, legends of
at most eight entries, the verdicts first and a leaderboard that fits a 1400 px page."""

from __future__ import annotations

import html
import json
import math
import random
import re
import shutil
import subprocess

import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from raymerge.report import page, plots
from raymerge.report.model import OBJECTIVE, Report, primary_metrics
from raymerge.score.objective import Objective

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TYPES = [
    "linear",
    "cat",
    "ties",
    "dare_linear",
    "svd",
    "core_ties",
    "tsv",
    "dare_ties",
    "magnitude",
]
PAIRS = [("sums", "upper"), ("reverse", "upper")]
WEIGHTS = [[0.3, 0.7], [0.5, 0.5], [0.7, 0.3], [1.0, 1.0]]
OBJ = Objective.parse("upper_choice.accuracy")
VERDICTS = [
    {
        "reference": "base model",
        "objective": 0.2,
        "difference": 0.31,
        "low": 0.18,
        "high": 0.44,
        "verdict": "better",
        "examples": 64,
        "examples_needed": None,
        "text": "The best merge beats the base model by 0.31 (95% interval 0.18 to 0.44).",
    },
    {
        "reference": "upper alone",
        "objective": 0.5,
        "difference": 0.01,
        "low": -0.09,
        "high": 0.11,
        "verdict": "not distinguishable",
        "examples": 64,
        "examples_needed": 5200,
        "text": "Not distinguishable from upper alone on 64 examples; about 5200 would tell.",
    },
    {
        "reference": "sums alone",
        "objective": 0.9,
        "difference": -0.39,
        "low": -0.5,
        "high": -0.28,
        "verdict": "worse",
        "examples": 64,
        "examples_needed": None,
        "text": "Worse than sums alone by 0.39 <on accuracy> (95% interval -0.50 to -0.28).",
    },
]


def _scores(rng: random.Random, sets: int = 0, stderr: bool = True) -> dict:
    """A merge's (or reference's) metrics: two text-loss sets, a choice set, a generation set."""
    loss, accuracy = rng.uniform(2.0, 8.0), rng.uniform(0.05, 0.85)
    scores = {
        "sums": {"loss": loss, "perplexity": math.exp(loss), "tokens": 300},
        "reverse": {"loss": rng.uniform(2.0, 8.0), "perplexity": 10.0, "tokens": 300},
        "upper_choice": {"accuracy": accuracy, "accuracy_norm": accuracy, "examples": 64},
        "gen": {"exact_match": rng.uniform(0.0, 0.5), "examples": 64},
    }
    for extra in range(sets):
        scores[f"extra{extra}"] = {"loss": rng.uniform(2.0, 8.0), "tokens": 100}
    if stderr:
        for values in scores.values():
            for key in [k for k in values if k not in ("tokens", "examples")]:
                values[f"{key}_stderr"] = rng.uniform(0.02, 0.05 if key != "loss" else 0.3)
    return scores


def _row(rng, pair, weights, kind, new: bool, sets: int = 0) -> dict:
    scores = _scores(rng, sets, stderr=new)
    row = {
        "merge_id": f"{kind}-{'+'.join(pair)}-{weights}",
        "trial": "",
        "adapters": "+".join(pair),
        "weights": " ".join(f"{w:.3g}" for w in weights),
        "combination_type": kind,
        "params": "density=0.5,majority_sign_method=total,svd_rank=8" if kind != "linear" else "",
        "kept": True,
        OBJECTIVE: OBJ.value(scores),
        "_line": {"weights": weights, "adapters": [{"name": a} for a in pair], "metrics": scores},
    }
    for name, values in scores.items():
        for key, value in values.items():
            if key not in ("tokens", "examples"):
                row[f"{name}.{key}"] = value
    if new:
        row[f"{OBJECTIVE}_stderr"] = row["upper_choice.accuracy_stderr"]
    return row


def _report(new: bool = True, sets: int = 0, tied: int = 3) -> Report:
    rng = random.Random(7)
    rows = [
        _row(rng, pair, weights, kind, new, sets)
        for pair in PAIRS
        for weights in WEIGHTS
        for kind in TYPES
    ]
    rows.sort(key=lambda r: -r[OBJECTIVE])
    if new:
        for rank, row in enumerate(rows):
            row["tied"] = rank < tied
        rows[-1]["tied"] = None  # unknown
    metrics = [c for c in rows[0] if "." in c and not c.endswith("_stderr")]
    references = {
        "base": _scores(rng, sets, stderr=new),
        "adapters": {name: _scores(rng, sets, stderr=new) for name in ("sums", "reverse", "upper")},
    }
    report = Report(rows, metrics, OBJ, "out/leaderboard.csv", "out/report.html", references)
    if new:
        report.verdicts = [dict(v) for v in VERDICTS]
    return report


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_lines() or ax.collections]


def _values(ax) -> list[float]:
    """Every finite y value the panel draws: lines, error-bar caps, the references' lines."""
    found = []
    for line in ax.get_lines():
        found += [float(y) for y in line.get_ydata() if math.isfinite(float(y))]
    return found


def test_a_loss_and_an_accuracy_never_share_an_axis():
    report = _report()
    shown = primary_metrics(report.metrics)
    assert {"sums.loss", "upper_choice.accuracy", "gen.exact_match"} <= set(shown)
    fig = plots.weight_plots(report.rows, shown, OBJ, report.references)
    panels = _panels(fig)
    for ax in panels:
        values = _values(ax)
        assert values, ax.get_title()
        # Losses here are 2..8 (± 0.3), accuracies and exact matches 0..1: never both on one axis.
        assert max(values) <= 1.0 or min(values) >= 1.5, (ax.get_title(), min(values), max(values))
    assert len(panels) == (1 + len(shown)) * len(PAIRS)  # the objective and each metric, per pair
    by_metric = {ax.get_label() for ax in panels}
    assert by_metric == {OBJECTIVE, *shown}
    for ax in panels:
        assert ax.get_label() in ax.get_title()


def test_points_carry_error_bars_and_the_best_merge_and_references_are_marked():
    report = _report()
    shown = primary_metrics(report.metrics)
    fig = plots.weight_plots(report.rows, shown, OBJ, report.references)
    best = report.rows[0]
    share = best["_line"]["weights"][0] / sum(best["_line"]["weights"])
    ringed = []
    for ax in _panels(fig):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
        assert bars and any(len(c.lines[2][0].get_segments()) for c in bars), ax.get_title()
        texts = {t.get_text() for t in ax.texts}
        first, second = ax.get_title().split(":")[0].split("+")
        assert {f"{first} alone", f"{second} alone"} <= texts, ax.get_title()
        name, _, key = ax.get_label().rpartition(".")
        base = report.references["base"]
        base = OBJ.value(base) if ax.get_label() == OBJECTIVE else base[name][key]
        assert any(list(line.get_ydata()) == [base, base] for line in ax.get_lines())
        for collection in ax.collections:
            if isinstance(collection, PathCollection) and [share, best[ax.get_label()]] in [
                list(p) for p in collection.get_offsets()
            ]:
                ringed.append(ax.get_title())
    assert sorted(ringed) == sorted(f"{best['adapters']}: {c}" for c in [OBJECTIVE, *shown])


def test_legends_have_at_most_eight_entries():
    report = _report()
    shown = primary_metrics(report.metrics)
    figures = [
        plots.weight_plots(report.rows, shown, OBJ, report.references),
        plots.tradeoff_plot(report.rows, shown, report.references),
    ]
    for fig in figures:
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        assert legends
        for legend in legends:
            assert 1 <= len(legend.get_texts()) <= 8
        labels = {t.get_text() for legend in legends for t in legend.get_texts()}
        assert "other types" in labels  # nine types: the last two pooled
        assert report.rows[0]["combination_type"] in labels  # the types in order of their best


def test_the_tradeoff_plot_has_error_bars_on_both_metrics():
    report = _report()
    fig = plots.tradeoff_plot(report.rows, primary_metrics(report.metrics), report.references)
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert any(c.has_xerr and c.has_yerr for c in bars)
    assert {"base model", "sums alone", "best"} <= {t.get_text() for t in ax.texts}


def _main_table(text: str) -> str:
    return re.search(r'<table class="leaderboard">.*?</table>', text, re.S).group(0)


def test_the_page_opens_with_the_verdicts_and_a_leaderboard_with_standard_errors():
    report = _report()
    text = page.render("out", report)
    leaderboard = text.index("<h2>Leaderboard")
    for verdict in VERDICTS:
        assert html.escape(verdict["text"]) in text
        assert text.index(html.escape(verdict["text"])) < leaderboard
    svg = re.search(r'<svg class="intervals".*?</svg>', text, re.S).group(0)
    assert text.index(svg) < leaderboard
    assert svg.count('class="interval"') == len(VERDICTS)
    assert svg.count('class="difference"') == len(VERDICTS)
    assert 'class="zero"' in svg
    table = _main_table(text)
    best = report.rows[0]
    assert page.estimate(best[OBJECTIVE], best[f"{OBJECTIVE}_stderr"]) in table
    assert page.estimate(best["sums.loss"], best["sums.loss_stderr"]) in table
    assert table.count(" ± ") == 25 * (1 + len(primary_metrics(report.metrics)))
    assert table.count("tied with the top") == 2  # rows 2 and 3; the first is the top
    assert "perplexity" not in table and "accuracy_norm" not in table  # one metric per set
    details = re.search(r"<details>.*?</details>", text, re.S).group(0)
    assert "sums.perplexity" in details and "accuracy_norm" in details
    assert 'href="leaderboard.csv"' in details
    assert text.count('src="data:image/png;base64,') == 2  # the verdicts' plot is inline SVG


def test_the_main_table_keeps_to_six_metrics():
    report = _report(sets=6)
    text = page.render("out", report)
    table = _main_table(text)
    headers = re.findall(r"<th[ >]", table)
    assert len(headers) == 2 + 1 + 1 + page.MAIN_METRICS  # #, merge, objective, vs the top
    assert "upper_choice" in table  # the objective's own metric is always among them
    assert "4 more sets' metrics are under All columns" in text


def test_an_old_report_without_standard_errors_or_verdicts_still_renders():
    report = _report(new=False)
    assert report.verdicts == []
    text = page.render("out", report)
    assert "better than the references" not in text and "<svg" not in text
    assert " ± " not in _main_table(text) and "vs the top" not in text
    assert text.count('src="data:image/png;base64,') == 2


def test_estimates():
    assert page.estimate(0.46875, 0.0624) == "0.469 ± 0.062"
    assert page.estimate(-4.16691, 0.213) == "-4.167 ± 0.21"
    assert page.estimate(61.2, 25.0) == "61.200 ± 25"
    assert page.estimate(0.5, math.nan) == page.estimate(0.5) == "0.5000"
    assert page.estimate(0.0, 0.0) == "0.000 ± 0"
    assert page.estimate(math.nan, 0.1) == "n/a"
    assert page.estimate("cat") == "cat"


MEASURE = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("table.leaderboard") || document.querySelector("table");
  const board = table.getBoundingClientRect();
  const images = [...document.images].map((i) => i.getBoundingClientRect().right);
  document.title = "MEASURED " + JSON.stringify({
    viewport: window.innerWidth,
    page: document.documentElement.scrollWidth,
    board: board.right,
    images: Math.max(...images),
  });
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's)")
def test_the_page_fits_1400_px_in_headless_chromium(tmp_path):
    text = page.render("out", _report(sets=2)).replace("</body>", MEASURE)
    path = tmp_path / "report.html"
    path.write_text(text)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1400,2000", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"MEASURED (\{.*?\})</title>", html.unescape(dom.stdout))
    assert found, dom.stderr[-2000:]
    measured = json.loads(found.group(1))
    assert measured["viewport"] == 1400, measured
    assert measured["page"] <= 1400 and measured["board"] <= 1400 - 16, measured
    assert measured["images"] <= 1400, measured
