"""Racing a grid (`evaluate.racing`) and pruning a search: who is stopped, what is recorded, the
same top-1 as full evaluation, a resumed race, fewer scored examples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.errors import SpecError
from raymerge.score import racing
from raymerge.score.objective import Objective
from raymerge.score.summaries import mean_metrics
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan
from raymerge.sweep.search import startup_trials

ADAPTERS = ("sums", "reverse", "upper")


def _choice_scores(right: list[int]) -> tuple[dict, dict]:
    examples = {"qa": {"accuracy": right, "accuracy_norm": right}}
    return {"qa": mean_metrics(examples["qa"])}, examples


def test_a_candidate_far_behind_is_stopped_and_one_within_noise_is_not():
    """32 examples: the leader right on 28, a rival on 27 (one example apart: noise), a laggard
    on 4 (24 apart). The bound stops the laggard only; halving keeps the best half."""
    leader = [1] * 28 + [0] * 4
    rival = [1] * 27 + [0] * 5
    laggard = [0] * 28 + [1] * 4
    scores = {"lead": _choice_scores(leader), "rival": _choice_scores(rival)}
    scores["lag"] = _choice_scores(laggard)
    objective = Objective.parse("qa.accuracy")
    keep, standings = racing.bound_survivors(objective, scores, top=1, confidence=0.99)
    assert keep == ["lead", "rival"]
    assert standings["lag"].behind_by == pytest.approx(0.75)
    assert standings["rival"].behind_by == pytest.approx(1 / 32)
    keep, _ = racing.halving_survivors(objective, scores, top=1, eta=2)
    assert keep == ["lead", "rival"]
    keep, _ = racing.halving_survivors(objective, scores, top=1, eta=3)
    assert keep == ["lead"]


def test_an_example_order_is_a_seeded_permutation_and_prefixes_grow():
    order = racing.example_order(3, "qa", 50)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == racing.example_order(3, "qa", 50) != racing.example_order(4, "qa", 50)
    assert racing.prefixes(16, 2, 64) == [16, 32] and racing.prefixes(64, 2, 64) == []
    assert startup_trials(13) == 3 and startup_trials(1000) == 10


def _spec(demo_dir: Path, output: Path, racing_spec: dict | None, **extra) -> dict:
    evaluate = {
        "datasets": {
            "upper": str(demo_dir / "eval" / "upper.jsonl"),
            "upper_choice": {
                "path": str(demo_dir / "eval" / "upper_choice.jsonl"),
                "kind": "choice",
            },
        },
        "max_samples": 64,
        "batch_size": 16,
        "max_length": 32,
        "adapters_per_pass": 8,
        "objective": "upper.loss",
    }
    if racing_spec is not None:
        evaluate["racing"] = racing_spec
    spec = {
        "base_model": str(demo_dir / "world" / "base"),
        "adapters": {t: str(demo_dir / "world" / "adapters" / t) for t in ADAPTERS},
        "combinations": [
            {
                "choose": 2,
                "weights": [[0.3, 0.7], [0.5, 0.5], [0.7, 0.3], [1.0, 1.0]],
                "methods": [{"combination_type": ["linear", "cat", "svd"]}],
            }
        ],
        "output": str(output),
        "workers": 1,
        "gpus_per_worker": 0,
        "evaluate": evaluate,
    }
    spec.update(extra)
    return spec


def _run(root: Path, spec: dict, name: str):
    plan = load_plan(write_spec(root, spec, f"{name}.yaml"))
    return plan, run_sweep(plan)


@pytest.fixture(scope="module")
def grid(demo_dir, tmp_path_factory):
    """The same 36-merge grid scored fully and raced (rounds of 16 and 32 of 64 examples)."""
    root = tmp_path_factory.mktemp("racing")
    full = _run(root, _spec(demo_dir, root / "full", None), "full")
    race = _run(root, _spec(demo_dir, root / "race", {"first": 16}), "race")
    return root, full, race


def _by_status(output: str) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {"done": {}, "stopped": {}, "failed": {}}
    for line in read_manifest(output):
        out[line["status"]][line["merge_id"]] = line
    return out


def _recipe(line: dict) -> tuple:
    names = tuple(a["name"] for a in line["adapters"])
    return names, tuple(line["weights"]), line["combination_type"]


def test_racing_finds_the_top_1_of_full_evaluation_for_a_third_of_the_cost(grid):
    """Measured: round 1 scores all 36 merges on 16 examples of each set (1152 scorings, a
    quarter of the 4608 a full evaluation makes, which no race can go below), stops 34 of them,
    and the 2 left (svd and cat of sums+upper at 0.3/0.7, within each other's noise: both kept)
    cost 64 more in round 2 and 128 to finish: 1344 scorings, 29.2%. A third is 1536: up to two
    more merges kept to the end would still fit, a third would not. The nearest stops are 2.8
    and 3.0 standard errors behind (the bound stops at 2.33): no thread count or rounding moves
    them; a rule that kept those would be a different rule."""
    _, (full_plan, full), (race_plan, race) = grid
    truth = sorted(_by_status(full_plan.output)["done"].values(), key=lambda x: x["objective"])
    raced = _by_status(race_plan.output)
    assert full.done == 36 and race.done + race.stopped == 36 and race.failed == 0
    best = min(raced["done"].values(), key=lambda line: line["objective"])
    assert best["merge_id"] == truth[0]["merge_id"]
    for name, metrics in truth[0]["metrics"].items():  # survivors are scored on everything
        for key, value in metrics.items():
            assert best["metrics"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert truth[1]["merge_id"] in raced["done"], "a merge within noise of the best was stopped"
    fraction = race.examples_scored / race.examples_if_full
    assert race.examples_if_full == full.examples_scored == 36 * 128
    assert fraction <= 1 / 3, fraction


def test_a_stopped_merge_is_recorded_with_what_it_saw(grid):
    """The laggards are listed as stopped, with partial metrics, their stderr and the examples
    they saw; nothing of them is written."""
    race_plan, race = grid[2]
    stopped = _by_status(race_plan.output)["stopped"]
    assert len(stopped) == race.stopped >= 20
    far = next(
        line
        for line in stopped.values()
        if _recipe(line) == (("sums", "reverse"), (1.0, 1.0), "linear")
    )
    assert far["stopped"] == "racing" and far["round"] == 1
    assert far["examples_seen"] == {"upper": 16, "upper_choice": 16}
    assert far["metrics"]["upper"]["examples"] == 16 and far["metrics"]["upper"]["loss_stderr"] > 0
    assert far["standing"]["behind_by"] > 5 * far["standing"]["stderr"]
    assert not (Path(race_plan.output) / "merges" / far["merge_id"]).exists()
    assert race.race[0]["prefix"] == 16 and race.race[0]["candidates"] == 36


def test_a_resumed_race_scores_only_the_rounds_not_committed(grid, demo_dir):
    """A driver lost after round 1 (its journal kept, the rest gone): the rerun reuses round 1,
    scores round 2 and the survivors, and ends where the whole race did."""
    root, _, (race_plan, race) = grid
    resumed = root / "resumed"
    shutil.copytree(Path(race_plan.output) / "race", resumed / "race")
    (resumed / "race" / "window-s0-16-32.json").unlink()
    spec = _spec(demo_dir, resumed, {"first": 16})
    _, again = _run(root, spec, "resumed")
    assert again.race[0]["examples_scored"] == 0
    assert again.race[0]["examples_reused"] == race.race[0]["examples_scored"] > 0
    assert again.race[1]["examples_scored"] == race.race[1]["examples_scored"] > 0
    assert sorted(_by_status(str(resumed))["done"]) == sorted(_by_status(race_plan.output)["done"])
    _, third = _run(root, spec, "resumed")  # all committed: nothing is scored again
    assert third.examples_scored == 0 and third.done == 0 and third.stopped == race.stopped


def test_a_pruned_search_scores_fewer_examples_than_an_unpruned_one(demo_dir, tmp_path):
    """The same seeded search of 10 candidates, with Optuna's pruner and without."""
    search = {
        "choose": 2,
        "weights": {"low": 0.0, "high": 1.0},
        "methods": [{"combination_type": ["linear", "cat", "svd"]}],
        "budget": 10,
        "seed": 0,
    }
    used = {}
    for pruner in ("none", "halving", "wilcoxon"):
        spec = _spec(demo_dir, tmp_path / pruner, {"first": 16}, combinations=[])
        spec["search"] = {**search, "pruner": pruner}
        plan, summary = _run(tmp_path, spec, pruner)
        lines = read_manifest(plan.output)
        assert len(lines) == 10 and summary.done + summary.stopped == 10
        assert all(line.get("stopped") == "pruned" for line in lines if line["status"] != "done")
        used[pruner] = summary.examples_scored
    assert used["none"] == 10 * 128
    assert used["halving"] < 0.8 * used["none"] and used["wilcoxon"] < used["none"], used


def test_a_search_budgeted_in_evaluations_spends_pruned_savings_on_more_candidates(
    demo_dir, tmp_path
):
    """Budget 6 evaluations of 128 examples: pruned candidates cost their share, so more than 6
    are asked, and what is scored stays within the budget (the last one asked fits whole)."""
    spec = _spec(demo_dir, tmp_path / "out", {"first": 16}, combinations=[])
    spec["search"] = {
        "choose": 2,
        "weights": {"low": 0.0, "high": 1.0},
        "methods": [{"combination_type": ["linear", "cat", "svd"]}],
        "budget": 6,
        "budget_unit": "evaluations",
        "pruner": "halving",
        "seed": 0,
    }
    plan, summary = _run(tmp_path, spec, "evaluations")
    lines = read_manifest(plan.output)
    pruned = [line for line in lines if line["status"] == "stopped"]
    assert len(lines) > 6 and len(pruned) >= len(lines) - 6
    assert 5 * 128 < summary.examples_scored <= 6 * 128
    assert len(lines) == summary.done + summary.stopped


def test_racing_refuses_lm_eval_tasks(demo_dir, tmp_path):
    spec = _spec(demo_dir, tmp_path / "out", {"first": 16})
    spec["evaluate"]["lm_eval"] = {"tasks": ["arith"]}
    with pytest.raises(SpecError, match="racing"):
        load_plan(write_spec(tmp_path, spec))
