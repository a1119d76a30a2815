"""`raymerge bench search`: on the demo world (three trained task adapters, its objective), the
full grid the demo runs against random search, TPE and CMA-ES, several seeds each, in one run:
the best objective each reaches after 10, 20 and 30 evaluations (one worker, so that each
search's sequence of candidates is the one its seed gives; a search of budget b is the first b
trials of the longest).
"""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

SAMPLERS = ("random", "tpe", "cmaes")
BUDGETS = (10, 20, 30)

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
    root: Path, *, seeds: int = 3, samplers=SAMPLERS, budgets=BUDGETS, log=print
) -> dict[str, Any]:
    import ray

    from raymerge.cluster.driver import run_sweep
    from raymerge.demo.demo import prepare_demo
    from raymerge.score.objective import Objective
    from raymerge.store.manifest import read_manifest
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
        for sampler in samplers:
            runs = []
            for seed in range(seeds):
                log(f"searching: {sampler}, seed {seed}")
                search = {**SPACE, "budget": max(budgets), "sampler": sampler, "seed": seed}
                output = _run(demo, spec, f"{sampler}-{seed}", {"search": search,
                              "combinations": []}, run_sweep, load_plan)  # fmt: skip
                lines = sorted(
                    (line for line in read_manifest(output) if "trial" in line),
                    key=lambda line: line["trial"],
                )
                trials = [line.get("objective", float("nan")) for line in lines]
                runs.append([_best(trials[:b], objective) for b in budgets])
            figures[sampler] = {
                "median_best": [
                    statistics.median(run[i] for run in runs) for i in range(len(budgets))
                ],
                "by_seed": runs,
            }
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
