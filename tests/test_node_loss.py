"""Capacity that comes back is used: a worker whose node is lost is taken up again once Ray has
restarted it on new capacity, and a run never waits without bound for capacity that never comes.

The first tests drive the dispatcher with in-process workers whose worker 0 "loses its node" the
way Ray 2.60 reports it (ActorUnavailableError: WorkerUnavailable); the last runs a real sweep on
a simulated multi-node Ray cluster (tests/node_loss_run.py, in its own process: this one may hold
the session's Ray instance) and removes the node of one worker mid-sweep."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import base_spec, write_spec
from lost_node import LostNode

from raymerge.cluster import executor
from raymerge.cluster.dispatch import Dispatch, make_scheduler
from raymerge.cluster.resume import prepare_output
from raymerge.cluster.summary import RunSummary
from raymerge.cluster.worker import MergeWorker
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

SCENARIO = Path(__file__).with_name("node_loss_run.py")


def _plan(world, tmp_path: Path, workers: int, weights: int):
    spec = base_spec(world, tmp_path / "out", workers=workers)
    spec["combinations"][0].update(
        weights=[[0.5, round(0.01 * i, 2)] for i in range(1, weights + 1)],
        methods=[{"combination_type": ["linear", "cat"]}],
    )
    return load_plan(write_spec(tmp_path, spec))


def _dispatch(plan, answers: list[str] | None, restart_timeout: float | None = None, hold=5.0):
    """Dispatch `plan` on in-process workers whose worker 0 is lost (LostNode): its summary and
    how long that took."""
    out = prepare_output(plan, False)
    config = plan.worker_config()
    indices = range(plan.spec.workers)
    workers = LostNode({i: MergeWorker(i, config, out.digests) for i in indices}, answers, hold)
    summary = RunSummary(output=plan.output, total=plan.total())
    scheduler = make_scheduler(plan, plan.tasks(), None)
    started = time.monotonic()
    try:
        dispatch = Dispatch(
            plan,
            workers,
            scheduler,
            out.writer,
            summary,
            None,
            False,
            restart_timeout=restart_timeout,
        )
        dispatch.run()
    finally:
        workers.close()
        out.writer.close(timeout=30)
    return summary, time.monotonic() - started


@pytest.fixture
def fast_probes(monkeypatch):
    monkeypatch.setattr(executor, "PROBE_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(executor, "PROBE_MAX_SECONDS", 0.05)


def test_a_worker_back_after_a_restart_is_given_work_again(world, tmp_path, fast_probes):
    plan = _plan(world, tmp_path, workers=2, weights=10)
    summary, _ = _dispatch(plan, ["restarting", "restarting", "restarting"])
    assert (summary.done, summary.failed, summary.not_run) == (20, 0, 0)
    assert summary.retries >= 1 and summary.workers["0"].restarts == 1
    lines = read_manifest(plan.output)
    assert Counter(line["merge_id"] for line in lines) == {t.merge_id: 1 for t in plan.tasks()}
    assert summary.workers["0"].done >= 1  # all after the restart: its first calls all failed
    assert sum(line["worker"] == 0 for line in lines) == summary.workers["0"].done


def test_a_run_ends_when_the_others_finish_without_waiting_for_a_worker_still_down(
    world, tmp_path, fast_probes
):
    plan = _plan(world, tmp_path, workers=2, weights=3)
    summary, seconds = _dispatch(plan, None, hold=0.5)
    assert (summary.done, summary.failed, summary.not_run) == (6, 0, 0)
    assert summary.workers["0"].done == 0 and summary.workers["1"].done == 6
    assert seconds < 60  # not restart_timeout (600 s)


def test_a_run_whose_every_worker_is_down_waits_a_bounded_time(world, tmp_path, fast_probes):
    plan = _plan(world, tmp_path, workers=1, weights=3)
    summary, seconds = _dispatch(plan, None, restart_timeout=1.0)
    assert (summary.done, summary.failed) == (0, 6)
    assert all("every merge worker died" in f["error"] for f in summary.failures)
    assert 1.0 <= seconds < 30


def test_a_worker_out_of_restarts_is_dropped_and_not_counted_as_restarted(
    world, tmp_path, fast_probes
):
    plan = _plan(world, tmp_path, workers=2, weights=3)
    summary, _ = _dispatch(plan, ["restarting", "dead"])  # Ray: ActorDiedError
    assert (summary.done, summary.failed) == (6, 0)
    assert summary.workers["0"].restarts == 0 and summary.workers["0"].done == 0


def test_a_worker_whose_node_is_lost_rejoins_on_a_node_added_mid_sweep(world, tmp_path):
    """Two nodes, one worker each; once merges are committed, one node is killed (SIGKILL, no
    drain) and another added: Ray restarts the worker there, and it commits merges again."""
    spec = base_spec(world, tmp_path / "out", workers=2, gpus_per_worker=1, cpus_per_worker=1)
    spec["adapters"] = {n: spec["adapters"][n] for n in ("a", "b", "d")}
    spec["combinations"] = [
        {
            "choose": 2,
            "weights": [[0.5, round(0.01 * i, 2)] for i in range(1, 81)],
            "methods": [{"combination_type": "cat"}],  # d's rank is not a's and b's
        }
    ]
    spec_path = write_spec(tmp_path, spec)
    plan = load_plan(spec_path)
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    # Its session files stay out of /tmp/ray, in a short path (Ray's sockets live there).
    env["RAY_TMPDIR"] = ray_dir = tempfile.mkdtemp(prefix="rm-nodes-")
    env.setdefault("RAYMERGE_CACHE", str(tmp_path / "cache"))
    command = [sys.executable, str(SCENARIO), str(spec_path), str(report)]
    # A session of its own: on a timeout, its Ray processes are killed with it.
    run = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        steps = "\n".join(line for line in output.splitlines() if _worth_showing(line))
        pytest.fail(f"the scenario did not end within 240 s:\n{steps}")
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    steps = "\n".join(line for line in output.splitlines() if _worth_showing(line))
    assert run.returncode == 0, steps
    result = json.loads(report.read_text())
    summary = result["summary"]
    planned = sorted(t.merge_id for t in plan.tasks())
    assert (summary["done"], summary["failed"], summary["not_run"]) == (len(planned), 0, 0)
    [lost] = [i for i, w in summary["workers"].items() if w["node"] == result["lost_node"]]
    assert summary["workers"][lost]["restarts"] == 1
    lines = read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines) == planned  # each exactly once
    assert all(line["status"] == "done" for line in lines)
    assert sorted(p.parent.name for p in Path(plan.output).glob("merges/*/merge.json")) == planned
    before = set(result["committed_before_restart"])
    after = [
        line for line in lines if line["worker"] == int(lost) and line["merge_id"] not in before
    ]
    assert len(after) >= 3, f"worker {lost} committed {len(after)} merges after its restart"


def _worth_showing(line: str) -> bool:
    """The scenario's steps, the driver's word on its workers and errors (not Ray's log dumps)."""
    return line.startswith(("[scenario", "merge worker", "Traceback", "  File")) or (
        "Error" in line and not line.startswith(" ")
    )
