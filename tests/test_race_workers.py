"""One way to lose and regain a worker, whatever it was doing: a race's rounds take a restarted
worker up again as dispatch does, a search candidate goes round by round (so it can be pruned)
whatever it was drawn with, and a resumed run's keep top-k starts from the merges it carries, the
last manifest line of each."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from helpers import demo_merge_spec, write_spec
from lost_node import LostNode

from raymerge.cluster import executor
from raymerge.cluster.driver import run_sweep
from raymerge.cluster.executor import LocalWorkers
from raymerge.cluster.fleet import Fleet
from raymerge.cluster.keep import KeepTopK, final_top
from raymerge.cluster.race import RoundScorer
from raymerge.cluster.worker import MergeWorker
from raymerge.score.objective import Objective
from raymerge.store import commits, manifest
from raymerge.sweep.plan import load_plan
from raymerge.task import Window


def _scored_spec(demo_dir: Path, output: Path, weights: list[list[float]], **extra) -> dict:
    """Linear merges of the demo's `upper` and `sums` adapters, scored on `upper`."""
    evaluate = {
        "datasets": {"upper": str(demo_dir / "eval" / "upper.jsonl")},
        "max_samples": 32,
        "batch_size": 16,
        "adapters_per_pass": 1,
        "objective": "upper.loss",
    }
    return demo_merge_spec(demo_dir, output, weights, evaluate, **extra)


def test_a_worker_restarted_during_a_race_round_scores_again(demo_dir, tmp_path, monkeypatch):
    """Worker 0's node is lost at its first window call; Ray restarts it after three probes.
    The round's calls go to worker 1 meanwhile, and worker 0, back, is given race work again;
    nothing fails."""
    monkeypatch.setattr(executor, "PROBE_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(executor, "PROBE_MAX_SECONDS", 0.05)
    weights = [[round(0.1 * i, 1), 0.5] for i in range(1, 9)]
    plan = load_plan(write_spec(tmp_path, _scored_spec(demo_dir, tmp_path / "out", weights)))
    config = plan.worker_config()
    workers = LostNode({i: MergeWorker(i, config) for i in (0, 1)}, ["restarting"] * 3)
    try:
        fleet = Fleet(workers)
        got, failed = RoundScorer(fleet, plan).score(list(plan.tasks()), Window(0, 0, 8))
    finally:
        workers.close()
    assert failed == {} and len(got) == 8
    assert workers.calls_after_back["score_window"] >= 1
    worker = fleet.workers[0]
    assert worker.alive and not worker.down and worker.restarts == 1


def test_a_search_candidate_drawn_with_grid_merges_goes_round_by_round(
    demo_dir, tmp_path, monkeypatch
):
    """Several merges per call (`adapters_per_pass: 4`): the first search candidate is drawn
    in the same call as the grid's last merges, and still goes through the pruner's rounds
    (score_window) before it is merged in full, as every candidate does."""
    calls: list[tuple[str, list]] = []
    submit = LocalWorkers.submit

    def recorded(self, index, method, *args):
        if method in ("merge_many", "score_window"):
            calls.append((method, [task for task in args[0]]))
        return submit(self, index, method, *args)

    monkeypatch.setattr(LocalWorkers, "submit", recorded)
    spec = _scored_spec(demo_dir, tmp_path / "out", [[1.0, 0.0], [0.5, 0.5]])
    spec["evaluate"].update(adapters_per_pass=4, racing={"first": 8})
    spec["search"] = {
        "adapters": ["upper", "sums"],
        "weights": {"low": 0.0, "high": 1.0},
        "methods": [{"combination_type": "linear"}],
        "budget": 3,
        "seed": 0,
        "pruner": "halving",
    }
    summary = run_sweep(load_plan(write_spec(tmp_path, spec)), use_ray=False)  # calls seen here
    assert summary.failed == 0
    first_call: dict[str, str] = {}
    for method, tasks in calls:
        for task in tasks:
            if task.trial is not None:
                first_call.setdefault(task.merge_id, method)
    assert len(first_call) == 3
    assert set(first_call.values()) == {"score_window"}, first_call
    # The scenario happened: a candidate's first round and grid merges sent in one feed (the
    # candidate first: taken out of the call it was drawn in).
    pairs = itertools.pairwise(calls)
    assert any(
        first[0] == "score_window"
        and first[1][0].trial is not None
        and second[0] == "merge_many"
        and all(task.trial is None for task in second[1])
        for first, second in pairs
    ), [(method, [task.trial for task in tasks]) for method, tasks in calls]


def test_a_resumed_run_keeps_files_only_for_merges_that_beat_those_it_carries(demo_dir, tmp_path):
    """keep top 1: the first run's best (upper alone) keeps its files. The rerun adds merges
    that lack the upper skill: none of them is ever written (no manifest line says kept),
    and after it, each merge's listed `kept` is what its folder holds."""
    output = tmp_path / "out"
    first = _scored_spec(demo_dir, output, [[1.0, 0.0], [0.6, 0.4]], keep={"top": 1})
    run_sweep(load_plan(write_spec(tmp_path, first, "first.yaml")))
    worse = [[0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]
    second = _scored_spec(demo_dir, output, [[1.0, 0.0], [0.6, 0.4], *worse], keep={"top": 1})
    plan = load_plan(write_spec(tmp_path, second, "second.yaml"))
    summary = run_sweep(plan)
    assert (summary.done, summary.skipped) == (3, 2)
    lines = manifest.read_manifest(str(output))
    best = min(lines, key=lambda line: line["objective"])
    assert best["weights"] == [1.0, 0.0]
    new = {task.merge_id for task in plan.tasks() if list(task.weights) in worse}
    every_line = list(manifest.iter_lines(str(output)))
    assert not [line for line in every_line if line["merge_id"] in new and line["kept"]]
    for line in lines:
        weights_file = Path(line["path"]) / "adapter_model.safetensors"
        assert line["kept"] == weights_file.exists() == (line is best), line["weights"]


def test_an_output_from_before_kept_records_resumes_without_making_merges_again(demo_dir, tmp_path):
    """An output whose keep top-k removed files without marking merge.json (as raymerge did
    before): its manifest says which merges lost their files on purpose, so a rerun keeps them
    committed (and marks them now) rather than making them again."""
    output = tmp_path / "out"
    spec = _scored_spec(demo_dir, output, [[1.0, 0.0], [0.6, 0.4], [0.0, 1.0]], keep={"top": 1})
    plan = load_plan(write_spec(tmp_path, spec))
    run_sweep(plan)
    dropped = [line for line in manifest.read_manifest(str(output)) if not line["kept"]]
    assert len(dropped) == 2
    for line in dropped:  # as the earlier version left them
        record_file = Path(line["path"]) / "merge.json"
        record = json.loads(record_file.read_text())
        for entry in record["files"].values():
            entry.pop("kept", None)
        record_file.write_text(json.dumps(record))
    again = run_sweep(plan)
    assert (again.done, again.skipped) == (0, 3)
    for line in dropped:
        record = commits.read_committed(str(output), line["merge_id"])
        assert record is not None
        assert all(entry["kept"] is False for entry in record["files"].values())


def test_keep_top_k_breaks_ties_as_its_final_pass_does():
    """Two merges with the same objective and k = 1: the one pushed out while the run goes is
    the one the final pass leaves out (the smaller id stays), so the top k keeps its files."""
    objective = Objective.parse("qa.accuracy")
    lines = [
        {"merge_id": m * 16, "status": "done", "kept": True, "objective": 0.5,
         "metrics": {"qa": {"accuracy": 0.5}}}
        for m in ("b", "a")
    ]  # fmt: skip
    top = KeepTopK(1, objective)
    pushed_out = [merge_id for line in lines for merge_id in top.offer(line)]
    assert pushed_out == ["b" * 16]
    assert final_top(lines, 1, objective) == {"a" * 16}
