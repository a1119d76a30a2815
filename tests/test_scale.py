"""Scale and faults: locality-aware dispatch, bounded adapter caches, dead workers, dead drivers,
fail-fast, transient storage errors, placement groups."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import ray
import torch
from botocore.exceptions import ClientError
from helpers import assert_matches_peft, base_spec, wait_for_commits, write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.cluster.workers import start_workers
from raymerge.demo.world import AdapterShape, build_adapter
from raymerge.store import storage
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

NAMES = [f"t{i}" for i in range(8)]
ADAPTER_BYTES = 8 * 2 * 4 * 64 * 4  # 8 modules x (A + B) x r=4 x 64 features x float32


@pytest.fixture(scope="module")
def eight(world, tmp_path_factory):
    """Eight rank-4 adapters on the session's base model."""
    root = tmp_path_factory.mktemp("eight")
    return {
        name: build_adapter(
            world.base_model, root / name, AdapterShape(r=4, lora_alpha=8), seed=200 + i
        )
        for i, name in enumerate(NAMES)
    }


def _pairs_spec(world, eight, output: Path, **overrides) -> dict:
    spec = base_spec(
        world,
        output,
        workers=2,
        adapters={name: str(path) for name, path in eight.items()},
        combinations=[
            {
                "choose": 2,
                "weights": [[0.5, 0.5], [0.3, 0.7]],
                "methods": [{"combination_type": ["linear", "cat"]}],
            }
        ],
    )
    spec.update(overrides)
    return spec


def test_locality_loads_far_fewer_adapters_than_round_robin(world, eight, ray_cluster, tmp_path):
    cache = {"adapter_cache_gb": 3 * ADAPTER_BYTES / 2**30}  # room for 3 adapters per worker
    loads = {}
    for scheduling in ("locality", "round_robin"):
        spec = _pairs_spec(world, eight, tmp_path / scheduling, scheduling=scheduling, **cache)
        plan = load_plan(write_spec(tmp_path, spec, f"{scheduling}.yaml"))
        summary = run_sweep(plan)
        assert (summary.done, summary.failed) == (28 * 4, 0)
        assert set(summary.workers) == {"0", "1"}
        lines = read_manifest(plan.output)
        assert sum(line["adapter_loads"] for line in lines) == summary.adapter_loads
        loads[scheduling] = summary.adapter_loads
    # Round-robin splits every pair's 4 merges over both workers and thrashes their caches.
    assert loads["locality"] <= 0.5 * loads["round_robin"], loads
    assert loads["locality"] < 28 * 2  # fewer loads than merges of distinct pairs x 2 adapters


def test_a_tiny_adapter_cache_still_merges_correctly(world, eight, ray_cluster, tmp_path):
    spec = _pairs_spec(world, eight, tmp_path / "out", adapter_cache_gb=1e-9, workers=1)
    spec["combinations"][0].update(
        {"from": NAMES[:4], "weights": [[0.6, -0.4]], "methods": [{"combination_type": "cat"}]}
    )
    plan = load_plan(write_spec(tmp_path, spec))
    summary = run_sweep(plan)
    assert (summary.done, summary.failed) == (6, 0)
    # Pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): the cache keeps only the adapters of the call
    # at hand (one or more merges), so adapters are loaded again where an unbounded cache would
    # load each of the 4 once, and never more than twice per merge.
    assert 4 < summary.adapter_loads <= 12
    for line in read_manifest(plan.output):
        names = [a["name"] for a in line["adapters"]]
        record = json.loads(Path(line["path"], "merge.json").read_text())
        adapters = [eight[n] for n in names]
        assert_matches_peft(
            world.base_model, adapters, record, Path(line["path"]), rel=1e-6, svd_delta_rel=1e-5
        )


def _slow_spec(world, eight, output: Path) -> dict:
    """Enough merges (1,008) to act while the sweep runs: cheap merges go several per call, so
    a sweep of a few hundred could end before the test gets to disturb it."""
    spec = _pairs_spec(world, eight, output)
    spec["combinations"][0].update(
        {
            "weights": [[0.5, round(0.05 * i, 2)] for i in range(1, 13)],
            "methods": [{"combination_type": "svd", "svd_rank": [2, 3, 4]}],
        }
    )
    return spec


def _run_cli(spec_path: Path, ray_address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raymerge", "run", str(spec_path)],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_commits(output: Path, count: int, process: subprocess.Popen) -> None:
    def running() -> bool:
        return process.poll() is None

    wait_for_commits(lambda: len(list(output.glob("merges/*/merge.json"))), count, running)


def _assert_each_merge_once(plan) -> None:
    planned = sorted(task.merge_id for task in plan.tasks())
    lines = read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines) == planned  # each exactly once
    assert all(line["status"] == "done" for line in lines)
    folders = sorted(p.name for p in Path(plan.output, "merges").iterdir())
    assert folders == planned
    assert not list(Path(plan.output).glob("manifest-segments/*"))  # compacted at the end
    assert all(Path(plan.output, "merges", m, "merge.json").exists() for m in planned)


def test_a_killed_worker_is_replaced_and_its_tasks_retried(world, eight, ray_cluster, tmp_path):
    spec_path = write_spec(tmp_path, _slow_spec(world, eight, tmp_path / "out"))
    plan = load_plan(spec_path)
    run = _run_cli(spec_path, ray_cluster)
    _wait_for_commits(tmp_path / "out", 4, run)
    # This session's Ray instance runs under this process: never another test process's workers.
    victims = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.name().startswith("ray::MergeWorker")
    ]
    assert victims, "no merge worker process found"
    victims[0].send_signal(signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    summary = json.loads(Path(plan.output, "summary.json").read_text())
    assert summary["retries"] >= 1 and summary["failed"] == 0
    assert sum(w["restarts"] for w in summary["workers"].values()) == 1
    _assert_each_merge_once(plan)


def test_a_killed_driver_resumes_without_writing_twice(world, eight, ray_cluster, tmp_path):
    spec_path = write_spec(tmp_path, _slow_spec(world, eight, tmp_path / "out"))
    plan = load_plan(spec_path)
    run = _run_cli(spec_path, ray_cluster)
    _wait_for_commits(tmp_path / "out", 4, run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    time.sleep(1)  # let Ray reap the dead driver's workers
    committed = {
        p.parent.name: p.stat().st_mtime_ns for p in Path(plan.output).glob("merges/*/merge.json")
    }
    assert 4 <= len(committed) < 12 * 28 * 3

    again = _run_cli(spec_path, ray_cluster)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert f"Skipping {len(committed)} merges already done" in output
    _assert_each_merge_once(plan)
    for merge_id, mtime in committed.items():  # committed merges were not written again
        assert Path(plan.output, "merges", merge_id, "merge.json").stat().st_mtime_ns == mtime


@pytest.mark.skipif(torch.cuda.is_available(), reason="svd_driver merges succeed on CUDA")
def test_fail_fast_stops_dispatching_at_the_first_failure(world, ray_cluster, tmp_path):
    # A logical GPU on a CPU-only torch: the plan takes svd_driver, every such merge fails.
    spec = base_spec(world, tmp_path / "out", workers=1, gpus_per_worker=1)
    spec["combinations"][0].update(
        weights=[[0.1 * i, 0.5] for i in range(1, 6)],
        methods=[
            {"combination_type": "svd", "svd_driver": "gesvd"},
            {"combination_type": "linear"},
        ],
    )
    plan = load_plan(write_spec(tmp_path, spec))
    summary = run_sweep(plan, fail_fast=True)
    assert summary.failed >= 1
    assert summary.not_run >= 5
    assert summary.done + summary.failed + summary.not_run == 10
    assert len(read_manifest(plan.output)) == summary.done + summary.failed
    full = run_sweep(plan)  # without fail-fast, everything is tried; done merges are skipped
    assert full.skipped == summary.done and full.failed == 5 and full.done == 5 - summary.done


def test_each_worker_reserves_its_resources_in_a_strict_pack_placement_group(
    world, ray_cluster, tmp_path
):
    spec = base_spec(world, tmp_path / "out", workers=2, gpus_per_worker=1)
    plan = load_plan(write_spec(tmp_path, spec))
    workers, groups, _ = start_workers(plan, 120, fixed_size=False)
    try:
        assert len(groups) == 2
        for group in groups:
            table = ray.util.placement_group_table(group)
            assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
            assert list(table["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0}]
        infos = ray.get([w.info.remote() for w in workers.values()])
        assert sorted(i["cuda_visible_devices"] for i in infos) == ["0", "1"]
    finally:
        for worker in workers.values():
            ray.kill(worker, no_restart=True)
        for group in groups:
            ray.util.remove_placement_group(group)


def _client_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def test_transient_storage_errors_are_retried_with_jittered_backoff():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            try:
                raise _client_error("SlowDown", 503)
            except ClientError as exc:  # as s3fs does: a translated error over botocore's
                raise OSError(5, "Please reduce your request rate") from exc
        return "ok"

    assert storage.retrying(flaky, attempts=4, min_wait=0.01) == "ok"
    assert len(calls) == 3

    # Full jitter: the n-th wait is drawn from [0, min_wait * 2**n], never a lockstep delay.
    wait = storage.backoff(min_wait=0.5, max_wait=16)
    for attempt in (1, 3, 6):
        state = types.SimpleNamespace(attempt_number=attempt)
        draws = [wait(state) for _ in range(200)]
        assert all(0 <= d <= min(16, 0.5 * 2**attempt) for d in draws)
        assert len(set(draws)) > 150  # spread out, not one fixed delay

    permanent = []

    def missing():
        permanent.append(1)
        raise FileNotFoundError("s3://bucket/nope")

    with pytest.raises(FileNotFoundError):
        storage.retrying(missing, min_wait=0.01)
    assert permanent == [1]

    gave_up = []

    def down():
        gave_up.append(1)
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(ConnectionRefusedError):
        storage.retrying(down, attempts=3, min_wait=0.01)
    assert len(gave_up) == 3  # bounded: the error surfaces after the last attempt

    assert storage.is_transient(ConnectionResetError())
    assert storage.is_transient(_client_error("InternalError", 500))
    assert not storage.is_transient(_client_error("AccessDenied", 403))
    assert storage.is_fatal(_client_error("AccessDenied", 403))
    assert storage.is_fatal(OSError(errno.ENOSPC, "No space left on device"))
    assert not storage.is_fatal(ConnectionResetError())
