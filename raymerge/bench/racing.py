"""`raymerge bench racing`: racing a grid (`evaluate.racing`) against scoring every merge on
everything, on a world where the truth is known.

The world is the demo's (a tiny Llama with three trained task adapters: sums, reverse, upper)
with a fourth adapter in the pool, `noise`: random factors of the trained ones' shapes and
spreads (an adapter that learnt nothing, as a bad checkpoint would be), and eval sets of 256
examples each of the demo's kinds (three text sets, the choice set, the generation set), drawn
as the demo draws them. The grid merges every pair of the four adapters at six weightings with
six combination types (216 merges), ranked by the demo's objective.

The grid is scored once fully: its best merge is the true top-1. Then it is raced once per seed
of the example order (`evaluate.racing.seed`), each race into its own output, under each rule
asked for. For each race: the merge it ranks first (the best of its fully scored survivors),
whether that is the true top-1, else whether the two are statistically tied on the full sets
(their paired comparison over every example of the full run, `stats.compare`, is "not
distinguishable" at 95%), the pick's rank in the full ranking, and the share of the full run's
example-scorings it used. The targets: at most 25% of the scorings, and the true top-1 (or one
tied with it) found for at least 9 seeds in 10.

Then the search on the same world: TPE over the grid's space made continuous (every pair,
weights in [0, 1], the six types with their parameters as ranges), pruned by Optuna's Wilcoxon
pruner on the race's rounds, at a budget of 13 for 3 seeds: once in trials (13 candidates,
pruned ones scored on part of the examples) and once in evaluations (13 full evaluations' worth
of examples, so that pruning buys more candidates). The target: the median of the seeds' best
at least the grid's best.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from raymerge.bench.racing_world import World, racing_spec

RULES = ("bound",)
FRACTION_TARGET = 0.25
FOUND_TARGET = 0.9
"""Share of the seeds whose race finds the true top-1 or one tied with it."""
GRID_TARGET = {"merges": 200, "adapters": 4, "examples": 256}
SEARCH_BUDGET = 13
SEARCH_SEEDS = 3
SEARCH_METHODS = [
    {"combination_type": ["linear", "cat"]},
    {"combination_type": "ties", "density": {"low": 0.2, "high": 0.9}},
    {"combination_type": "dare_linear", "density": {"low": 0.3, "high": 0.9}},
    {"combination_type": "svd", "svd_rank": [4, 8, 16]},
    {"combination_type": "core_ties", "density": {"low": 0.2, "high": 0.9}, "svd_rank": [4, 8, 16]},
]
"""The grid's six types, their parameters as ranges (the search's space)."""


def bench_racing(
    root: Path,
    *,
    seeds: int = 10,
    workers: int = 1,
    rules=RULES,
    racing: dict[str, Any] | None = None,
    world: World = World(),
    search: bool = True,
    log=print,
) -> dict[str, Any]:
    """The figures: the full run's, then per rule each seed's race against it, then the search
    (see the module). `racing`: the `evaluate.racing` settings of every race (default: the
    spec's defaults)."""
    from raymerge.sweep.spec.evaluate import RacingSpec

    settings = RacingSpec.model_validate(racing or {}).model_dump(exclude={"rule", "seed"})
    spec = racing_spec(root, world, workers, log)
    ray = _start_ray(workers)
    try:
        log(f"scoring the grid fully ({world.examples} examples per set)")
        full, seconds = run_grid(root, spec, "full")
        truth = Truth.read(full)
        figures: dict[str, Any] = {
            "world": truth.world(spec, seeds),
            "full": {**truth.best(), "seconds": seconds},
            "racing": settings,
            "rules": {},
        }
        for rule in rules:
            rows = []
            for seed in range(seeds):
                log(f"racing the grid: rule {rule}, seed {seed}")
                raced = {**(racing or {}), "rule": rule, "seed": seed}
                update = {"evaluate": {**spec["evaluate"], "racing": raced}}
                output, seconds = run_grid(root, {**spec, **update}, f"{rule}-{seed}")
                rows.append({"seed": seed, **truth.judge(output), "seconds": seconds})
            figures["rules"][rule] = {"by_seed": rows, **totals(rows)}
        if search:
            figures["search"] = search_figures(root, spec, truth, log)
    finally:
        if ray is not None:
            ray.shutdown()
    figures["target"] = target(figures)
    return figures


def search_figures(
    root: Path, spec: dict[str, Any], truth: Truth, log=print, seeds: int = SEARCH_SEEDS
) -> dict[str, Any]:
    """TPE at SEARCH_BUDGET on the grid's world, budgeted in trials and in evaluations: the best
    each seed reaches, against the grid's best."""
    from raymerge.store.manifest import read_manifest

    grid_best = truth.lines[truth.ranking[0]]["objective"]
    figures: dict[str, Any] = {"budget": SEARCH_BUDGET, "grid_best": grid_best}
    space = {"choose": 2, "weights": {"low": 0.0, "high": 1.0}, "methods": SEARCH_METHODS}
    for unit in ("trials", "evaluations"):
        rows = []
        for seed in range(seeds):
            log(f"searching: tpe, budget {SEARCH_BUDGET} {unit}, seed {seed}")
            search = {**space, "budget": SEARCH_BUDGET, "budget_unit": unit, "seed": seed}
            evaluate = {**spec["evaluate"], "racing": {"seed": seed}}
            run = {**spec, "combinations": [], "search": search, "evaluate": evaluate}
            output, seconds = run_grid(root, run, f"search-{unit}-{seed}")
            lines = read_manifest(output)
            done = [line for line in lines if line["status"] == "done"]
            best = next(iter(ranked(truth.objective, done)), None)
            summary = json.loads((Path(output) / "bench-summary.json").read_text())
            rows.append({
                "seed": seed,
                "candidates": len(lines),
                "pruned": len(lines) - len(done),
                "best": next(x["objective"] for x in done if x["merge_id"] == best),
                "best_recipe": recipe(next(x for x in done if x["merge_id"] == best)),
                "examples_scored": summary["examples_scored"],
                "evaluations": round(summary["examples_scored"] / truth.examples_per_merge, 2),
                "seconds": seconds,
            })  # fmt: skip
        median = statistics.median(row["best"] for row in rows)
        reached = not truth.objective.better(grid_best, median)
        figures[unit] = {"by_seed": rows, "median_best": median, "reached": reached}
    return figures


def run_grid(root: Path, spec: dict[str, Any], name: str) -> tuple[str, float]:
    """One sweep of the grid into `root/demo/racing-<name>` (a fresh output): its output and
    wall seconds."""
    from raymerge.cluster.driver import run_sweep
    from raymerge.sweep.plan import load_plan

    folder = root / "demo"
    output = folder / f"racing-{name}"
    shutil.rmtree(output, ignore_errors=True)
    path = folder / f"racing-{name}.yaml"
    path.write_text(yaml.safe_dump({**spec, "output": f"./racing-{name}"}, sort_keys=False))
    started = time.perf_counter()
    summary = run_sweep(load_plan(path))
    seconds = round(time.perf_counter() - started, 1)
    if summary.failed:
        raise RuntimeError(f"bench sweep {name} had failures: {summary.failures[:3]}")
    (output / "bench-summary.json").write_text(json.dumps(summary.to_json()))
    return str(output), seconds


class Truth:
    """The full run: every merge scored on every example, ranked by the objective."""

    def __init__(self, output: str, plan, objective, lines: list[dict[str, Any]]):
        self.output = output
        self.plan = plan
        self.objective = objective
        self.lines = {line["merge_id"]: line for line in lines}
        self.ranking = ranked(objective, lines)
        self.examples_if_full = sum(
            sum(m.get("examples", 0) for m in line["metrics"].values()) for line in lines
        )
        self.examples_per_merge = self.examples_if_full / max(1, len(lines))

    @classmethod
    def read(cls, output: str) -> Truth:
        from raymerge.store.manifest import read_manifest, read_references
        from raymerge.sweep.plan import load_plan, objective

        plan = load_plan(Path(output).parent / f"{Path(output).name}.yaml")
        lines = read_manifest(output)
        if not lines or any(line["status"] != "done" for line in lines):
            raise RuntimeError(f"{output}: the full run left merges not done")
        return cls(output, plan, objective(plan.spec, read_references(output)), lines)

    def world(self, spec: dict[str, Any], seeds: int) -> dict[str, Any]:
        sets = self.plan.eval_sets
        return {
            "merges": len(self.lines),
            "adapters": len(spec["adapters"]),
            "examples_per_set": {name: entry["examples"] for name, entry in sets.items()},
            "objective": self.objective.name,
            "seeds": seeds,
        }

    def best(self) -> dict[str, Any]:
        line = self.lines[self.ranking[0]]
        return {
            "top1": self.ranking[0],
            "top1_recipe": recipe(line),
            "top1_objective": line["objective"],
            "runner_up_objective": self.lines[self.ranking[1]]["objective"],
            "tied_with_top1": sum(self.tied(m) for m in self.ranking[1:]),
            "examples_scored": self.examples_if_full,
        }

    def tied(self, merge_id: str) -> bool:
        """Whether `merge_id` is statistically tied with the true top-1 on the full sets."""
        from raymerge.score.stats import compare

        if merge_id == self.ranking[0]:
            return True
        best, other = (self.record(m) for m in (self.ranking[0], merge_id))
        return compare(self.objective, best, other).verdict == "not distinguishable"

    def record(self, merge_id: str) -> tuple[dict, dict]:
        """(metrics, per-example scores) of a merge of the full run (its merge.json)."""
        data = json.loads((Path(self.lines[merge_id]["path"]) / "merge.json").read_text())
        return data["metrics"], data["examples"]

    def judge(self, output: str) -> dict[str, Any]:
        """A race's figures against the truth."""
        from raymerge.store.manifest import read_manifest

        lines = read_manifest(output)
        done = [line for line in lines if line["status"] == "done"]
        summary = json.loads((Path(output) / "bench-summary.json").read_text())
        pick = ranked(self.objective, done)[0]
        truth = self.lines[pick]["objective"]
        raced = next(line for line in done if line["merge_id"] == pick)["objective"]
        return {
            "top1": pick,
            "top1_recipe": recipe(self.lines[pick]),
            "equal": pick == self.ranking[0],
            "tied": self.tied(pick),
            "found": self.tied(pick),
            "rank": self.ranking.index(pick) + 1,
            "objective": truth,
            "objective_as_raced": raced,
            "true_top1_stopped": self.ranking[0] not in {line["merge_id"] for line in done},
            "survivors": len(done),
            "stopped": sum(line["status"] == "stopped" for line in lines),
            "rounds": len(summary.get("race") or []),
            "examples_scored": summary["examples_scored"],
            "examples_if_full": summary["examples_if_full"],
            "examples_fraction": summary.get("examples_fraction", math.nan),
        }


def ranked(objective, lines: list[dict[str, Any]]) -> list[str]:
    """Merge ids best first by their line's objective (ties by id, as the race ranks them)."""
    ordered = sorted(lines, key=lambda x: (objective.sort_key(x["objective"]), x["merge_id"]))
    return [line["merge_id"] for line in ordered]


def recipe(line: dict[str, Any]) -> str:
    """A merge's recipe in a few words: its type, inputs and weights."""
    names = "+".join(a["name"] for a in line["adapters"])
    weights = "/".join(f"{w:g}" for w in line["weights"])
    return f"{line['combination_type']} {names} {weights}"


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A rule's figures over its seeds."""
    fractions = [row["examples_fraction"] for row in rows]
    return {
        "found": sum(row["found"] for row in rows),
        "equal": sum(row["equal"] for row in rows),
        "seeds": len(rows),
        "fraction_mean": round(sum(fractions) / len(fractions), 4),
        "fraction_max": max(fractions),
        "seconds": round(sum(row["seconds"] for row in rows), 1),
    }


def target(figures: dict[str, Any]) -> dict[str, Any]:
    """Whether the world is as large as the targets ask, and which rules meet them (every
    seed's fraction at most 25%, the top-1 found or tied for 90% of the seeds)."""
    world = figures["world"]
    sized = (
        world["merges"] >= GRID_TARGET["merges"]
        and world["adapters"] >= GRID_TARGET["adapters"]
        and min(world["examples_per_set"].values()) >= GRID_TARGET["examples"]
    )
    met = {
        rule: figures["rules"][rule]["fraction_max"] <= FRACTION_TARGET
        and figures["rules"][rule]["found"] >= math.ceil(FOUND_TARGET * world["seeds"] - 1e-9)
        for rule in figures["rules"]
    }
    return {
        "fraction": FRACTION_TARGET,
        "found": math.ceil(FOUND_TARGET * world["seeds"] - 1e-9),
        "world_sized": sized,
        "met": met,
    }


def _start_ray(workers: int):
    """A local Ray instance for more than one worker (one worker runs in this process)."""
    if workers <= 1:
        return None
    import ray

    ray.init(
        address="local",
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return ray
