"""`raymerge bench search`: on the demo world (three trained task adapters, its objective), the
full grid the demo runs against random search, TPE and CMA-ES, several seeds each, in one run:
the best objective each reaches with budgets of 13, 20 and 30 evaluations (one worker, so that
each search's sequence of candidates is the one its seed gives; each budget is its own search,
as TPE's random start is sized to the budget).

Then the cost of asynchrony: TPE at a budget of 13 with one candidate out at a time (each asked
knowing every earlier result; the default, `search.candidates_per_worker: 1`) against three out
on one worker, with and without the constant liar, and one out on each of two workers.
"""

from __future__ import annotations

import functools
import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

from raymerge.store.manifest import read_manifest

SAMPLERS = ("random", "tpe", "cmaes")
BUDGETS = (13, 20, 30)
ASYNC_BUDGET = 13
ASYNC_WAYS = {  # name: (workers, candidates out per worker, constant liar)
    "1 out (1 worker)": (1, 1, True),
    "3 out (1 worker), constant liar": (1, 3, True),
    "3 out (1 worker), no liar": (1, 3, False),
    "2 out (2 workers), constant liar": (2, 1, True),
}

SPACE = {
    "choose": 2,
    "weights": {"low": 0.0, "high": 1.0},
    "methods": [
        {"combination_type": ["linear", "cat"]},
        {"combination_type": "ties", "density": {"low": 0.2, "high": 0.9}},
        {"combination_type": "dare_linear", "density": {"low": 0.3, "high": 0.9}},
        {"combination_type": "svd", "svd_rank": [4, 8, 16]},
    ],
}
"""The grid's space made continuous: every pair, weights in [0, 1], the grid's five types."""


def bench_search(
    root: Path,
    *,
    seeds: int = 3,
    samplers=SAMPLERS,
    budgets=BUDGETS,
    asynchrony: bool = True,
    log=print,
) -> dict[str, Any]:
    import ray

    from raymerge.cluster.driver import run_sweep
    from raymerge.demo.demo import prepare_demo
    from raymerge.score.objective import Objective
    from raymerge.sweep.plan import load_plan

    demo = prepare_demo(root / "demo", workers=1, log=log)
    spec = yaml.safe_load(demo.read_text())
    spec["workers"] = 1
    spec["cpus_per_worker"] = 2
    objective = Objective.parse(spec["evaluate"]["objective"])
    ray.init(
        address="local",
        num_cpus=3,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    figures: dict[str, Any] = {"objective": objective.name, "budgets": list(budgets)}
    try:
        log("running the demo's grid")
        grid = _run(demo, spec, "grid", {}, run_sweep, load_plan)
        values = [line["objective"] for line in read_manifest(grid) if "objective" in line]
        figures["grid"] = {"evaluations": len(values), "best": _best(values, objective)}
        search = functools.partial(_search, demo, spec, objective, run_sweep, load_plan, log)
        for sampler in samplers:
            runs = [[search(sampler, seed, b) for b in budgets] for seed in range(seeds)]
            figures[sampler] = {
                "median_best": [
                    statistics.median(run[i] for run in runs) for i in range(len(budgets))
                ],
                "by_seed": runs,
            }
        if asynchrony and "tpe" in samplers:
            figures["asynchrony"] = _asynchrony(search, seeds)
    finally:
        ray.shutdown()
    figures["target"] = _target(figures, budgets, objective)
    return figures


def _target(figures: dict[str, Any], budgets, objective) -> dict[str, Any]:
    """Which guided samplers reach the grid's best with half the grid's evaluations."""
    half = max(b for b in budgets if b <= figures["grid"]["evaluations"] / 2)
    index = list(budgets).index(half)
    return {
        "budget": half,
        "grid_best": figures["grid"]["best"],
        "met_by": [
            s
            for s in ("tpe", "cmaes")
            if s in figures
            and not objective.better(figures["grid"]["best"], figures[s]["median_best"][index])
        ],
    }


def _asynchrony(search, seeds: int) -> dict[str, Any]:
    """TPE at ASYNC_BUDGET: one candidate out at a time against two, with and without the liar."""
    figures: dict[str, Any] = {"budget": ASYNC_BUDGET}
    for way, (workers, out, liar) in ASYNC_WAYS.items():
        runs = [search("tpe", s, ASYNC_BUDGET, workers, out, liar) for s in range(seeds)]
        figures[way] = {"median_best": statistics.median(runs), "by_seed": runs}
    return figures


def _search(
    demo, spec, objective, run_sweep, load_plan, log, sampler, seed, budget, workers=1, out=1,
    liar=True,
) -> float:  # fmt: skip
    """The best objective one search of `budget` trials reaches."""
    log(f"searching: {sampler}, seed {seed}, budget {budget}, {workers} worker(s), {out} out each")
    search = {**SPACE, "budget": budget, "sampler": sampler, "seed": seed}
    search["candidates_per_worker"] = out
    if sampler == "tpe":
        search["constant_liar"] = liar
    name = f"{sampler}-{seed}-{budget}-{workers}x{out}{'' if liar else '-noliar'}"
    run = {**spec, "workers": workers, "cpus_per_worker": 2 if workers == 1 else 1}
    output = _run(demo, run, name, {"search": search, "combinations": []}, run_sweep, load_plan)
    trials = [line.get("objective", float("nan")) for line in read_manifest(output)]
    return _best(trials, objective)


def _best(values: list[float], objective) -> float:
    values = [v for v in values if v == v]
    if not values:
        return float("nan")
    return min(values, key=objective.sort_key)


def _run(demo: Path, spec: dict, name: str, update: dict, run_sweep, load_plan) -> str:
    output = demo.parent / f"bench-{name}"
    shutil.rmtree(output, ignore_errors=True)
    run = {**spec, **update, "output": f"./bench-{name}"}
    path = demo.parent / f"bench-{name}.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    summary = run_sweep(load_plan(path))
    if summary.failed:
        raise RuntimeError(f"bench sweep {name} had failures: {summary.failures[:3]}")
    return str(output)
