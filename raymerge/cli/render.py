"""What the commands print: the plan, a sweep's summary, leaderboards, the demo's verdict,
rebuilt merges and benchmark figures. Only output here; no command logic."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from raymerge.cli.console import consoles


def number(value) -> str:
    """A figure for a table cell: four decimals for floats, n/a when missing or NaN.

    >>> number(0.123456), number(3), number(None), number(float("nan"))
    ('0.1235', '3', 'n/a', 'n/a')
    """
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _better(objective) -> str:
    return "lower" if objective.direction == "minimize" else "higher"


def print_plan(summary: dict[str, Any]) -> None:
    """Merges per combination type, and the adapters they are made from."""
    consoles.out.print(f"Plan: {summary['total']} merges → {summary['output']}")
    table = Table()
    table.add_column("combination type")
    table.add_column("merges", justify="right")
    for name, count in summary["by_type"].items():
        table.add_row(name, str(count))
    consoles.out.print(table)
    adapters = Table(title="Adapters")
    for column in ("name", "r", "lora_alpha"):
        adapters.add_column(column)
    adapters.add_column("location", overflow="fold")
    for name, info in summary["adapters"].items():
        adapters.add_row(name, str(info["r"]), str(info["lora_alpha"]), info["uri"])
    consoles.out.print(adapters)
    for warning in summary.get("warnings", []):
        consoles.err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def print_summary(summary: dict[str, Any]) -> None:
    """A finished sweep's counts and costs, then its first ten failures on stderr."""
    table = Table(title="Sweep summary", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    keys = ("done", "skipped", "failed", "not_run", "retries", "total", "seconds", "merge_seconds")
    for key in (*keys, "merges_per_s", "adapter_loads", "bytes_written"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    per_worker = ", ".join(
        f"w{k}: {w['done']} merges, {w['adapter_loads']} loads"
        for k, w in summary["workers"].items()
    )
    table.add_row("per worker", per_worker)
    if summary.get("stage_seconds"):
        table.add_row("stage seconds", stage_line(summary["stage_seconds"]))
    if summary.get("executor"):
        table.add_row("workers ran", summary["executor"])
    if summary.get("examples_if_full"):
        table.add_row("stopped early", str(summary.get("stopped", 0)))
        scored, full = summary["examples_scored"], summary["examples_if_full"]
        share = f"{scored:,} of {full:,} ({100 * scored / full:.1f}% of scoring every merge fully)"
        table.add_row("examples scored", share)
    table.add_row("output", summary["output"])
    consoles.out.print(table)
    for failure in summary["failures"][:10]:
        consoles.err.print(Text(f"failed {failure['merge_id']}: {failure['error']}", "red"))


def stage_line(stages: dict[str, float]) -> str:
    """Seconds per stage, slowest first: the stages overlap, so the slowest sets the pace."""
    ordered = sorted(stages.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in ordered)


def estimate(value, stderr) -> str:
    """A figure with its standard error: "0.4375 ± 0.0625" (the figure alone without one).

    >>> estimate(0.4375, 0.0625), estimate(1.0, None)
    ('0.4375 ± 0.0625', '1.0000')
    """
    if isinstance(stderr, float | int) and stderr == stderr:
        return f"{number(value)} ± {stderr:.4f}"
    return number(value)


def print_leaderboard(result, top: int) -> None:
    """The TOP best merges of a report (≈: statistically tied with the top), then the base
    model and each adapter alone (dimmed): the objective ± its stderr and one metric per eval
    set (the CSV has every metric and stderr). Fits 100 columns."""
    from raymerge.report.model import primary_metrics

    objective = result.objective
    shown = primary_metrics(result.metrics)
    table = Table(
        title=f"Best merges by {objective.name} ({_better(objective)} is better)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("#", justify="right", no_wrap=True, min_width=3)
    table.add_column("merge", justify="left", ratio=1, min_width=16)
    table.add_column("objective", justify="right", no_wrap=True)
    for metric in shown:  # the set's name over its metric's: narrow columns
        name, _, key = metric.rpartition(".")
        table.add_column(f"{name}\n{key}", justify="right", no_wrap=True, overflow="fold")
    for rank, row in enumerate(result.rows[:top], start=1):
        mark = "≈" if row.get("tied") and rank > 1 else ""
        merge = f"{row['adapters']} {row['combination_type']} {row['weights']}"
        values = [number(row[m]) for m in shown]
        table.add_row(
            f"{rank}{mark}", merge, estimate(row["objective"], row.get("objective_stderr")),
            *values,
        )  # fmt: skip
    for verdict in getattr(result, "verdicts", None) or []:
        name = verdict["reference"]
        scores = _reference_scores(result.references, name)
        values = [_metric(scores, m) for m in shown]
        table.add_row(
            "ref", name, estimate(verdict["objective"], verdict.get("objective_stderr")),
            *values, style="dim",
        )  # fmt: skip
    if result.references and not getattr(result, "verdicts", None):
        for name, scores in _references(result.references):
            values = [_metric(scores, m) for m in shown]
            table.add_row("ref", name, number(objective.value(scores)), *values, style="dim")
    consoles.out.print(table)
    if any(row.get("tied") for row in result.rows[1:top]):
        consoles.out.print("≈: not distinguishable from the top merge on the same examples (95%)")
    stopped = getattr(result, "stopped", None) or []
    if stopped:
        consoles.out.print(
            f"{len(stopped)} more merges were stopped early (behind after part of the examples): "
            "their partial scores are in leaderboard.csv and the report"
        )


def _references(references) -> list[tuple[str, dict]]:
    out = [("base model", references["base"])]
    return out + [(f"{n} alone", s) for n, s in references["adapters"].items()]


def _reference_scores(references, label: str) -> dict:
    return dict(_references(references)).get(label, {}) if references else {}


def _metric(scores: dict, metric: str) -> str:
    name, _, key = metric.rpartition(".")
    return number(scores.get(name, {}).get(key))


def print_search(result) -> None:
    """A searched sweep's best against the grid's, and the parameters that mattered."""
    search = result.search
    if not search:
        return
    best, grid = search["search_best"], search["grid_best"]
    line = f"Search: best {result.objective.name} {number(best[-1])} after {len(best)} evaluations"
    if grid:
        line += f" (grid: {number(grid[-1])} after {len(grid)})"
    consoles.out.print(line)
    if search.get("importances"):
        ranked = sorted(search["importances"].items(), key=lambda kv: -kv[1])
        consoles.out.print(
            "Parameters that mattered: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        )


def print_outputs(result) -> None:
    """Where a report wrote its leaderboard and its HTML page."""
    consoles.out.print(f"Leaderboard: {result.csv_uri}\nReport: {result.html_uri}")


def verdict(result) -> str:
    """The best merge against every reference (base model, each input alone), each compared on
    the same examples: better, worse, or not distinguishable (and how many examples might tell).
    """
    if not result.references:
        return ""
    objective = result.objective
    best = result.rows[0]
    value = estimate(best["objective"], best.get("objective_stderr"))
    lines = [
        f"The best merge ({best['adapters']}, {best['combination_type']}, weights "
        f"{best['weights']}) reaches {value} on the objective {objective.name} "
        f"({_better(objective)} is better)."
    ]
    verdicts = getattr(result, "verdicts", None) or []
    lines += [f"  {v['text']}" for v in verdicts]
    singles = [v for v in verdicts if v["reference"] != "base model"]
    if singles and all(v["verdict"] == "better" for v in singles):
        lines.append("It beats every single adapter, each on the same examples.")
    elif singles:
        lines.append("It does not clearly beat every single adapter (see above).")
    return "\n".join(lines)


def print_grid_and_search(result) -> None:
    """The best of the grid's merges and of the search's candidates, each with how many were
    raced or pruned and how many scored on every example."""
    grid = [row for row in result.rows if row.get("trial") in (None, "")]
    searched = [row for row in result.rows if row.get("trial") not in (None, "")]
    stopped = result.stopped
    parts = []
    for name, rows, searching in (("grid", grid, False), ("search", searched, True)):
        if not rows:
            continue
        early = sum((row.get("trial") not in (None, "")) == searching for row in stopped)
        parts.append(
            f"{name}: best {rows[0]['objective']:.4f} ({len(rows) + early} merges, "
            f"{len(rows)} scored on every example)"
        )
    consoles.out.print("; ".join(parts).capitalize())


def print_kept_skills(row: dict[str, Any], kept: list[dict[str, Any]]) -> None:
    """What the best merge keeps of each merged adapter's own skill, skill by skill."""
    table = Table(title=f"What the best merge ({row['adapters']}, {row['combination_type']}) keeps")
    for column in ("skill", "base model", "adapter alone", "best merge", "kept"):
        table.add_column(column, justify="left" if column == "skill" else "right")
    for entry in kept:
        share = "" if entry["kept"] is None else f"{100 * entry['kept']:.0f}%"
        table.add_row(
            entry["skill"],
            number(entry["base"]),
            number(entry["alone"]),
            number(entry["merged"]),
            share,
        )
    consoles.out.print(table)


def print_rebuilt(results) -> None:
    """One line per rebuilt merge: where it is and whether it matches its merge.json."""
    for result in results:
        status = "matches its record" if result.matches_record else "DIFFERS from its record"
        note = f" ({result.note})" if result.note else ""
        consoles.out.print(f"{result.merge_id}: {result.path} — {status}{note}")


def print_rows(title: str, rows: list[dict[str, Any]], names: list[str]) -> None:
    """Figures as a table: one column per row given, one line per figure."""
    table = Table(title=title)
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        values = [row.get(key, "") for row in rows]
        if any(isinstance(v, dict) for v in values):
            values = [json.dumps(v) if isinstance(v, dict) else v for v in values]
        table.add_row(key.replace("_", " "), *(str(v) for v in values))
    consoles.out.print(table)


def print_merge_figures(figures: dict[str, Any]) -> None:
    """`bench merge`: merges/s of each type, and the driver's peak memory."""
    names = list(figures["types"])
    rows = [
        {k: v for k, v in row.items() if k != "stage_ms_per_merge"}
        for row in figures["types"].values()
    ]
    print_rows("merges/s, whole raymerge run (steady state)", rows, names)
    stages = [figures["types"][name].get("stage_ms_per_merge", {}) for name in names]
    if any(stages):
        print_rows(
            "ms per merge in each stage (they overlap: the slowest sets the pace)", stages, names
        )
    consoles.out.print(f"driver peak RSS: {figures['driver_peak_rss_mb']} MB")


def print_eval_figures(figures: dict[str, Any]) -> None:
    """`bench eval`: each way of scoring, and what batching merges in one pass gains."""
    ways = ["plain_loop", "merge_only", "per_pass_1", "per_pass_4", "per_pass_16"]
    print_rows("raymerge bench eval", [figures[w] for w in ways], ways)
    consoles.out.print(
        f"{figures['merges']} merges; 16 per pass / 1 per pass: "
        f"{figures['per_pass_16_over_1']}x merges/s, eval seconds per merge "
        f"{figures['eval_per_merge_1_over_16']}x lower"
    )


def print_harness_race(figures: dict[str, Any]) -> None:
    """`bench eval --world real`: seconds and tokens per merge, set by set and in all, for
    raymerge, the harness and the floor, and the largest difference in each metric."""
    ways = [k for k in figures["all"] if k.startswith("raymerge_per_pass_")]
    table = Table(title="Scoring a merge on the real model: raymerge and lm-evaluation-harness")
    table.add_column("set")
    table.add_column("harness s (tokens)", justify="right")
    for way in ways:
        table.add_column(f"{way.rsplit('_', 1)[1]} per pass s (tokens)", justify="right")
        table.add_column("vs harness", justify="right")
        table.add_column("vs floor", justify="right")
    table.add_column("floor s (tokens)", justify="right")
    rows = {**{f"{n} ({r['kind']})": r for n, r in figures["sets"].items()}, "all": figures["all"]}
    for label, row in rows.items():
        cells = [label, _seconds_tokens(row["harness"])]
        for way in ways:
            cells += [_seconds_tokens(row[way]), f"{row[way]['speedup_over_harness']}x",
                      f"{row[way]['over_floor']}x"]  # fmt: skip
        table.add_row(*cells, _seconds_tokens(row["floor"]))
    consoles.out.print(table)
    for way, gaps in figures["max_difference"].items():
        shown = ", ".join(f"{metric} {gap:g}" for metric, gap in gaps.items())
        consoles.out.print(f"largest difference from the harness ({way}): {shown}")


def _seconds_tokens(row: dict[str, Any]) -> str:
    return f"{row['seconds_per_merge']:.3f} ({row['tokens_per_merge']})"


def print_search_race(figures: dict[str, Any], seeds: int) -> None:
    """`bench search`: the best objective each sampler reached at each budget, against the grid."""
    budgets = figures["budgets"]
    table = Table(title=f"Best {figures['objective']} reached (median over {seeds} seeds)")
    table.add_column("way")
    for budget in budgets:
        table.add_column(f"{budget} evaluations", justify="right")
    grid = figures["grid"]
    table.add_row(f"grid ({grid['evaluations']} evaluations)", *([f"{grid['best']:.4f}"]
                  + [""] * (len(budgets) - 1)))  # fmt: skip
    for sampler in ("random", "tpe", "cmaes"):
        if sampler in figures:
            table.add_row(sampler, *(f"{v:.4f}" for v in figures[sampler]["median_best"]))
    consoles.out.print(table)
    target = figures["target"]
    consoles.out.print(
        f"At {target['budget']} evaluations (half the grid's or fewer), reaching the grid's "
        f"best ({target['grid_best']:.4f}): {', '.join(target['met_by']) or 'none'}"
    )
    asynchrony = figures.get("asynchrony")
    if asynchrony:
        ways = [way for way in asynchrony if way != "budget"]
        consoles.out.print(
            f"TPE at {asynchrony['budget']} evaluations, best reached by seed: "
            + "; ".join(
                f"{way} {' / '.join(f'{v:.4f}' for v in asynchrony[way]['by_seed'])}"
                for way in ways
            )
        )


def print_racing(figures: dict[str, Any]) -> None:
    """`bench racing`: each seed's race against the full run (its top-1, how it ranks there,
    the share of the scorings it used), then the verdict on the targets."""
    world, full = figures["world"], figures["full"]
    sizes = sorted(set(world["examples_per_set"].values()))
    consoles.out.print(
        f"Grid: {world['merges']} merges of {world['adapters']} adapters, "
        f"{'/'.join(map(str, sizes))} examples per set, objective {world['objective']}.\n"
        f"Full evaluation: true top-1 {full['top1_recipe']} ({full['top1_objective']:.4f}; "
        f"{full['tied_with_top1']} others tied with it at 95%), "
        f"{full['examples_scored']} example-scorings in {full['seconds']:.0f} s"
    )
    settings = ", ".join(f"{k} {v}" for k, v in figures["racing"].items() if v is not None)
    consoles.out.print(f"Racing settings: {settings}")
    for rule, result in figures["rules"].items():
        table = Table(title=f"Racing ({rule}) against full evaluation", box=box.SIMPLE_HEAD)
        for column in ("seed", "race's top-1", "objective", "rank", "found", "fraction"):
            table.add_column(column, justify="left" if column == "race's top-1" else "right")
        table.add_column("survivors", justify="right")
        table.add_column("seconds", justify="right")
        for row in result["by_seed"]:
            found = "equal" if row["equal"] else "tied" if row["tied"] else "NO"
            table.add_row(
                str(row["seed"]), row["top1_recipe"], f"{row['objective']:.4f}", str(row["rank"]),
                found, f"{row['examples_fraction']:.1%}", str(row["survivors"]),
                f"{row['seconds']:.0f}",
            )  # fmt: skip
        consoles.out.print(table)
        consoles.out.print(
            f"{rule}: top-1 found (equal or tied) for {result['found']}/{result['seeds']} seeds "
            f"({result['equal']} equal); example-scorings used {result['fraction_mean']:.1%} "
            f"on average, {result['fraction_max']:.1%} at most"
        )
    if figures.get("search"):
        _print_racing_search(figures["search"])
    target = figures["target"]
    met = [rule for rule, ok in target["met"].items() if ok]
    consoles.out.print(
        f"Targets (≥{target['found']}/{world['seeds']} found, ≤{target['fraction']:.0%} of the "
        f"scorings for every seed{'' if target['world_sized'] else '; world below target size'}"
        f"): {'met by ' + ', '.join(met) if met and target['world_sized'] else 'NOT met'}"
    )


def _print_racing_search(search: dict[str, Any]) -> None:
    """`bench racing`'s search: TPE at one budget, in trials and in evaluations, per seed."""
    table = Table(
        title=f"Search (TPE, Wilcoxon pruner) at a budget of {search['budget']}",
        box=box.SIMPLE_HEAD,
    )
    for column in ("budget in", "seed", "best reached", "recipe", "candidates", "pruned"):
        table.add_column(column, justify="left" if column in ("budget in", "recipe") else "right")
    table.add_column("evaluations used", justify="right")
    for unit in ("trials", "evaluations"):
        for row in search[unit]["by_seed"]:
            table.add_row(
                unit, str(row["seed"]), f"{row['best']:.4f}", row["best_recipe"],
                str(row["candidates"]), str(row["pruned"]), f"{row['evaluations']:.1f}",
            )  # fmt: skip
    consoles.out.print(table)
    for unit in ("trials", "evaluations"):
        result = search[unit]
        verdict = "reaches" if result["reached"] else "does NOT reach"
        consoles.out.print(
            f"budget {search['budget']} {unit}: median best {result['median_best']:.4f} "
            f"{verdict} the grid's best ({search['grid_best']:.4f})"
        )
