"""A small local run starts merging sooner: one CPU worker with no cluster named runs in the
driver's process, without Ray. It makes what the Ray path makes (files, merge.json, scores,
references), stops cleanly on a full disk, and `--ray` (or a cluster) still means Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import base_spec, methods_for, write_spec
from test_evaluate import _eval_spec
from test_faults import _no_partial_merges

from raymerge.cluster.driver import run_sweep, runs_in_process
from raymerge.errors import ClusterError, StorageError
from raymerge.store.commits import committed_merge_ids
from raymerge.store.manifest import merge_dir, read_manifest, read_references
from raymerge.sweep.plan import load_plan

RECORD_TIMINGS = ("seconds", "worker", "versions", "created_at")
"""merge.json's fields that say where, when and how fast a merge ran, not what it is."""


def _sweep(world, output, **overrides):
    group = {
        "adapters": ["a", "b"],
        "weights": [[0.6, 0.4], [1.0, -0.5]],
        "methods": methods_for(["linear", "cat", "ties", "dare_linear", "svd"], density=0.5),
    }
    return base_spec(world, output, combinations=[group], **overrides)


def _what_was_made(plan) -> dict[str, dict]:
    """Per merge: its files' bytes and its merge.json without the timings."""
    made = {}
    for merge_id in committed_merge_ids(plan.output):
        folder = Path(merge_dir(plan.output, merge_id))
        record = json.loads((folder / "merge.json").read_text())
        for key in RECORD_TIMINGS:
            record.pop(key, None)
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "merge.json"}
        made[merge_id] = {"record": record, "files": files}
    return made


def test_in_process_and_on_ray_make_the_same_merges(world, ray_cluster, tmp_path):
    plans = {}
    for use_ray in (False, True):
        name = "ray" if use_ray else "local"
        plan = load_plan(write_spec(tmp_path, _sweep(world, tmp_path / name), f"{name}.yaml"))
        summary = run_sweep(plan, use_ray=use_ray)
        assert (summary.done, summary.failed) == (10, 0)
        assert summary.executor == ("ray" if use_ray else "in-process")
        assert {"arithmetic", "write", "hash", "commit"} <= set(summary.stage_seconds)
        plans[name] = plan
    local, on_ray = (_what_was_made(plans[name]) for name in ("local", "ray"))
    assert len(local) == 10 and local == on_ray
    for name, plan in plans.items():
        lines = read_manifest(plan.output)
        assert sorted(line["merge_id"] for line in lines) == sorted(local), name


def test_scores_and_references_in_process_match_ray(demo_dir, ray_cluster, tmp_path):
    scores = {}
    for use_ray in (False, True):
        name = "ray" if use_ray else "local"
        spec = _eval_spec(demo_dir, str(tmp_path / name), workers=1)
        plan = load_plan(write_spec(tmp_path, spec, f"{name}.yaml"))
        assert run_sweep(plan, use_ray=use_ray).done == 4
        lines = read_manifest(plan.output)
        scores[name] = {line["merge_id"]: line["metrics"] for line in lines}
        scores[name]["references"] = read_references(plan.output)
    assert scores["local"] == scores["ray"]


def test_a_full_disk_in_process_stops_cleanly(world, tmp_path, mount):
    small = mount("small", "size=160k")
    spec = base_spec(world, small / "out")
    spec["combinations"][0]["weights"] = [[0.1 * i, 1.0] for i in range(1, 11)]
    spec["combinations"][0]["methods"] = [{"combination_type": "cat"}]  # ~64 KB each
    plan = load_plan(write_spec(tmp_path, spec))
    with pytest.raises(StorageError) as caught:
        run_sweep(plan, use_ray=False)
    assert "No space left on device" in str(caught.value)
    output = small / "out"
    _no_partial_merges(output)
    committed = committed_merge_ids(str(output))
    assert 0 < len(committed) < 10
    listed = {line["merge_id"] for line in read_manifest(str(output)) if line["status"] == "done"}
    assert listed <= committed


def test_which_runs_go_in_process(world, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = load_plan(write_spec(tmp_path, _sweep(world, tmp_path / "o1"), "one.yaml"))
    two = load_plan(write_spec(tmp_path, _sweep(world, tmp_path / "o2", workers=2), "two.yaml"))
    gpu = load_plan(write_spec(tmp_path, _sweep(world, tmp_path / "o3", gpus_per_worker=1)))
    assert not runs_in_process(two, None) and not runs_in_process(gpu, None)
    assert not runs_in_process(one, "ray://somewhere:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not runs_in_process(one, None)
    with pytest.raises(ClusterError, match="workers=2"):
        run_sweep(two, use_ray=False)


def _cli(spec: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "raymerge.cli.app", "run", str(spec), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_fresh_process_runs_one_worker_without_ray_and_ray_on_request(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_XDIST_WORKER")}
    spec = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    local = _cli(spec, env=env)
    assert local.returncode == 0, local.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["executor"] == "in-process" and summary["done"] == 1
    shutil.rmtree(tmp_path / "out")
    ray_dir = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # short: Ray's socket paths
    on_ray = _cli(spec, "--ray", env={**env, "RAY_TMPDIR": str(ray_dir)})
    assert on_ray.returncode == 0, on_ray.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["executor"] == "ray" and summary["done"] == 1
    assert any(ray_dir.iterdir())  # a Ray session was started there
    shutil.rmtree(ray_dir, ignore_errors=True)
