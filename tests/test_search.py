"""Adaptive search on the worker pool, keep top-k, and rebuilding any recorded merge."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for_commits, write_spec
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.cluster.driver import run_sweep
from raymerge.cluster.materialize import materialize
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

ADAPTERS = ("sums", "reverse", "upper")
SPACE = {
    "choose": 2,
    "weights": {"low": 0.0, "high": 1.0},
    "methods": [
        {"combination_type": ["linear", "cat"]},
        {"combination_type": "ties", "density": {"low": 0.2, "high": 0.9}},
    ],
}


def _spec(demo_dir: Path, output: Path, **overrides) -> dict:
    spec = {
        "base_model": str(demo_dir / "world" / "base"),
        "adapters": {t: str(demo_dir / "world" / "adapters" / t) for t in ADAPTERS},
        "search": {**SPACE, "budget": 8, "sampler": "tpe", "seed": 3},
        "output": str(output),
        "workers": 1,
        "evaluate": {
            "datasets": {t: str(demo_dir / "eval" / f"{t}.jsonl") for t in ADAPTERS},
            "max_samples": 16,
            "batch_size": 16,
            "max_length": 32,
        },
    }
    spec.update(overrides)
    return spec


def _settled_commits(merges: Path, quiet: float = 3.0, limit: float = 60.0) -> dict[str, int]:
    """The committed merges (merge id -> merge.json's mtime) once none came for `quiet` s."""
    started = last_change = time.monotonic()
    seen = None
    while time.monotonic() - started < limit:
        now = {p.parent.name: p.stat().st_mtime_ns for p in merges.glob("*/merge.json")}
        if now != seen:
            seen, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            break
        time.sleep(0.2)
    return seen


def _trials(output: str) -> list[dict]:
    return sorted(
        (line for line in read_manifest(output) if "trial" in line), key=lambda line: line["trial"]
    )


@pytest.fixture(scope="module")
def searched(demo_dir, ray_cluster, tmp_path_factory):
    """The same search (one worker, one seed) run twice, with keep top 3."""
    root = tmp_path_factory.mktemp("search")
    plans = []
    for name in ("one", "two"):
        spec = _spec(demo_dir, root / name, keep={"top": 3})
        plan = load_plan(write_spec(root, spec, f"{name}.yaml"))
        summary = run_sweep(plan)
        assert (summary.done, summary.failed) == (8, 0), summary.failures
        plans.append(plan)
    return plans


def test_a_search_is_reproducible_with_one_worker_and_a_seed(searched):
    one, two = (_trials(p.output) for p in searched)
    assert [t["trial"] for t in one] == list(range(8))
    assert [t["search_params"] for t in one] == [t["search_params"] for t in two]
    assert [t["merge_id"] for t in one] == [t["merge_id"] for t in two]
    assert len({t["merge_id"] for t in one}) == 8  # eight distinct candidates
    for line in one:  # each a normal merge: recorded, scored, with its trial
        record = json.loads(Path(line["path"], "merge.json").read_text())
        assert record["trial"] == line["trial"] and record["search_params"]
        assert set(record["metrics"]) == set(ADAPTERS)
        assert 0 <= record["weights"][0] <= 1 and 0 <= record["weights"][1] <= 1


def test_keep_leaves_exactly_the_best_k_adapters_and_every_record(searched):
    output = Path(searched[0].output)
    lines = read_manifest(str(output))
    assert len(lines) == 8
    assert len(list(output.glob("merges/*/merge.json"))) == 8  # every record stays
    with_files = {p.parent.name for p in output.glob("merges/*/adapter_model.safetensors")}
    assert len(with_files) == 3
    best = sorted(lines, key=lambda line: line["objective"])[:3]  # mean_loss: lower is better
    assert with_files == {line["merge_id"] for line in best}
    assert {line["merge_id"] for line in lines if line["kept"]} == with_files
    assert len(list(output.glob("merges/*/adapter_config.json"))) == 3


def test_materialize_rebuilds_kept_and_dropped_merges_to_their_digests(searched, tmp_path):
    output = searched[0].output
    lines = read_manifest(output)
    kept = next(line for line in lines if line["kept"])
    dropped = next(line for line in lines if not line["kept"])
    results = materialize(output, [kept["merge_id"], dropped["merge_id"]], str(tmp_path / "out"))
    assert all(r.matches_record for r in results), results
    for line in (kept, dropped):
        record = json.loads(Path(line["path"], "merge.json").read_text())
        for name, digest in record["files"].items():
            data = (tmp_path / "out" / line["merge_id"] / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest["sha256"]
    kept_bytes = Path(kept["path"], "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "out" / kept["merge_id"] / "adapter_model.safetensors").read_bytes() == (
        kept_bytes
    )
    # Back into the sweep itself: the dropped merge has its files again.
    result = CliRunner().invoke(app, ["materialize", output, dropped["merge_id"]])
    assert result.exit_code == 0 and "matches its record" in result.output, result.output
    assert Path(dropped["path"], "adapter_model.safetensors").exists()


def test_the_report_shows_the_search(searched, tmp_path):
    result = CliRunner().invoke(app, ["report", searched[0].output, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Search: best mean_loss" in result.output and "after 8 evaluations" in result.output
    assert "Parameters that mattered" in result.output
    page = (tmp_path / "report.html").read_text()
    assert "Best objective against evaluations" in page
    assert "trial" in (tmp_path / "leaderboard.csv").read_text().splitlines()[0]


BAD_SEARCHES = {
    "empty range": ({"weights": {"low": 1.0, "high": 1.0}}, "low 1 must be below high 1"),
    "budget of 0": ({"budget": 0}, "search.budget"),
    "missing objective set": (
        {"objectives": ["nowhere.loss", "sums.loss"], "sampler": "nsga2"},
        "search.objectives: 'nowhere.loss' names no eval set",
    ),
    "density out of range": (
        {"methods": [{"combination_type": "ties", "density": {"low": 0.0, "high": 0.5}}]},
        "density 0.0 is outside (0, 1]",
    ),
    "unknown adapter": ({"choose": None, "adapters": ["sums", "nope"]}, "unknown adapter 'nope'"),
    "cmaes for two objectives": (
        {"objectives": ["sums.loss", "upper.loss"], "sampler": "cmaes"},
        "sampler cmaes optimises one objective",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SEARCHES))
def test_a_bad_search_is_refused_like_a_bad_grid(demo_dir, tmp_path, case):
    change, expected = BAD_SEARCHES[case]
    spec = _spec(demo_dir, tmp_path / "out")
    spec["search"] = {**spec["search"], **change}
    result = CliRunner().invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_keep_needs_evaluate(demo_dir, tmp_path):
    spec = _spec(demo_dir, tmp_path / "out", keep={"top": 2})
    spec.pop("search")
    spec.pop("evaluate")
    spec["combinations"] = [
        {"choose": 2, "weights": [[0.5, 0.5]], "methods": [{"combination_type": "cat"}]}
    ]
    result = CliRunner().invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2 and "keep: keeping the best merges needs `evaluate`" in (
        result.output
    )


def test_a_killed_driver_resumes_the_search_without_evaluating_twice(
    demo_dir, ray_cluster, tmp_path
):
    spec = _spec(demo_dir, tmp_path / "out")
    spec["search"] = {**spec["search"], "budget": 12}
    spec["evaluate"]["max_samples"] = 64  # slow enough to be caught mid-search
    path = write_spec(tmp_path, spec)
    run = subprocess.Popen(
        [sys.executable, "-m", "raymerge", "run", str(path)],
        env={**os.environ, "RAY_ADDRESS": ray_cluster},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    merges = tmp_path / "out" / "merges"
    wait_for_commits(lambda: len(list(merges.glob("*/merge.json"))), 3, lambda: run.poll() is None)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    # The driver's worker may commit the merge it holds before Ray reaps it: wait until the
    # commits stop, then take what the rerun must not evaluate again.
    first = _settled_commits(merges)
    assert 3 <= len(first) < 12

    summary = run_sweep(load_plan(path))
    assert summary.failed == 0
    trials = _trials(str(tmp_path / "out"))
    assert len(trials) == 12  # the budget, in all
    assert len({t["merge_id"] for t in trials}) == 12
    assert summary.done == 12 - len(first)  # the committed trials were told, not evaluated again
    for merge_id, mtime in first.items():
        assert (merges / merge_id / "merge.json").stat().st_mtime_ns == mtime
