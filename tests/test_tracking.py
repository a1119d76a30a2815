"""MLflow tracking of sweeps, against a real `mlflow server` on 127.0.0.1 (sqlite backend, local
artifact store, both in a temporary folder): one parent run per run, one child per scored merge
holding exactly the scores raymerge wrote; a server that is down costs one warning, not the
sweep; the spec's `tracking` key is strict and holds no credential."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import demo_merge_spec, free_port, write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.errors import SpecError
from raymerge.store.manifest import MERGE_JSON, iter_lines, read_manifest
from raymerge.sweep.plan import load_plan
from raymerge.sweep.spec import parse_spec

QUIET_MLFLOW = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
"""No usage reports from the server or the client: the tests run offline."""
SERVER_ENV = {**QUIET_MLFLOW, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""Nor the server's job runner (a pool of worker processes the tests do not use)."""


def _start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, in its own process group; picks another port if
    one is taken before the server binds it."""
    for _ in range(3):
        port = free_port()
        log = open(folder / f"server-{port}.log", "w")  # noqa: SIM115 (closed with the server)
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **SERVER_ENV},
        )  # fmt: skip
        uri = f"http://127.0.0.1:{port}"
        # MLflow's client, imported while the server starts rather than in a sweep's first
        # seconds (where a run in this process pays for it in a background thread)
        import mlflow  # noqa: F401

        if _wait_up(uri, process, timeout=180):
            return process, uri
        _stop(process)
    pytest.fail(f"mlflow server did not start; see {folder}")


def _wait_up(uri: str, process: subprocess.Popen, timeout: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop(process: subprocess.Popen) -> None:
    """Its whole process group (the server and its uvicorn worker), killed: its data is a
    temporary folder."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for this module's tests; stopped at the end."""
    process, uri = _start_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        _stop(process)


@pytest.fixture
def quiet_mlflow(monkeypatch):
    for name, value in QUIET_MLFLOW.items():
        monkeypatch.setenv(name, value)


def _client(uri: str, monkeypatch):
    """A client for checking what was logged (a dead server fails its call at once)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(tracking_uri=uri)


def _raced_spec(demo_dir: Path, output: Path, uri: str, experiment: str) -> dict:
    """Four merges raced on upper.loss for the top 2, keeping the best one's files: after 16
    examples two are behind the second best by over 10 standard errors and stopped; the two
    left are scored in full, and the second loses its files (a later manifest line says so)."""
    sets = demo_dir / "eval"
    evaluate = {
        "datasets": {
            "upper": str(sets / "upper.jsonl"),
            "upper_choice": {"path": str(sets / "upper_choice.jsonl"), "kind": "choice"},
        },
        "max_samples": 64, "batch_size": 16, "max_length": 32, "adapters_per_pass": 4,
        "objective": "upper.loss", "racing": {"first": 16, "top": 2},
    }  # fmt: skip
    spec = demo_merge_spec(
        demo_dir, output, [[0.3, 0.7], [0.7, 0.3]], evaluate, adapters=("upper", "sums")
    )
    spec["adapters"]["reverse"] = str(demo_dir / "world" / "adapters" / "reverse")
    spec["combinations"].append(
        {"adapters": ["sums", "reverse"], "weights": [[1.0, 1.0]],
         "methods": [{"combination_type": ["linear", "ties"], "density": 0.5}]}
    )  # fmt: skip
    spec["keep"] = {"top": 1}  # the second of the two left is dropped: a later line for it
    spec["tracking"] = {"mlflow": {"uri": uri, "experiment": experiment}}
    return spec


def _logged_metrics(line: dict) -> dict[str, float]:
    """What a child run must hold: every number raymerge wrote for the merge (stderr too)."""
    expected = {
        f"{name}.{key}": value
        for name, values in line["metrics"].items()
        for key, value in values.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }
    for key in ("objective", "objective_stderr"):
        if isinstance(line.get(key), int | float):
            expected[key] = line[key]
    return expected


def test_a_sweep_is_one_parent_run_with_a_child_per_scored_merge(
    demo_dir, mlflow_server, quiet_mlflow, tmp_path, monkeypatch
):
    experiment = f"raced-{tmp_path.name}"
    path = write_spec(tmp_path, _raced_spec(demo_dir, tmp_path / "out", mlflow_server, experiment))
    plan = load_plan(path)
    summary = run_sweep(plan)
    scored = {line["merge_id"]: line for line in read_manifest(plan.output)}  # each one's last
    assert summary.done == 2 and summary.stopped == 2 and summary.failed == 0
    listed = Counter(line["merge_id"] for line in iter_lines(plan.output))
    [dropped] = [line for line in scored.values() if line.get("kept") is False]
    assert listed[dropped["merge_id"]] == 2  # listed again once keep top-k dropped its files

    client = _client(mlflow_server, monkeypatch)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run is not parent]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    assert sorted(run.info.run_name for run in children) == sorted(scored)  # one per merge
    for run in children:
        line = scored[run.info.run_name]
        assert run.data.metrics == _logged_metrics(line)  # the same values, stderr included
        assert any(key.endswith("_stderr") for key in run.data.metrics)
        params, tags = run.data.params, run.data.tags
        assert params["merge_id"] == line["merge_id"]
        assert params["adapters"] == ",".join(a["name"] for a in line["adapters"])
        assert params["weights"] == json.dumps(line["weights"])
        assert params["combination_type"] == line["combination_type"]
        assert params.get("density") == ("0.5" if line["combination_type"] == "ties" else None)
        assert tags["status"] == line["status"] and run.info.status == "FINISHED"
        assert tags.get("stopped") == line.get("stopped")  # racing, on the stopped ones
        assert tags.get("path") == line.get("path")  # the done merge's folder
        assert tags.get("kept") == (str(line["kept"]).lower() if "kept" in line else None)
        if line["status"] == "done":
            assert (Path(tags["path"]) / MERGE_JSON).is_file()

    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raymerge.output"] == plan.output
    assert parent.data.params["base_model"] == plan.base_model
    assert parent.data.params["adapters"] == "3" and parent.data.params["engine"] == "fast"
    assert parent.data.params["objective"] == "upper.loss"
    [best] = [line for line in scored.values() if line.get("kept") is True]
    assert parent.data.metrics["best_objective"] == best["objective"]
    assert parent.data.tags["best_merge_id"] == best["merge_id"]
    assert parent.data.metrics["merges_done"] == 2 and parent.data.metrics["merges_stopped"] == 2
    assert parent.data.metrics["merges_failed"] == 0
    logged = client.download_artifacts(parent.info.run_id, "spec/sweep.yaml", str(tmp_path))
    assert Path(logged).read_text() == path.read_text()


def test_a_tracking_server_that_is_down_costs_one_warning_not_the_sweep(
    demo_dir, quiet_mlflow, tmp_path, monkeypatch, caplog, capfd
):
    """MLFLOW_TRACKING_URI alone turns tracking on; its port is held but not listening (every
    connection refused). MLflow's client would retry for minutes: the sweep ends in seconds,
    every merge committed, with one warning naming the server without its password."""
    evaluate = {"datasets": {"upper": str(demo_dir / "eval" / "upper.jsonl")}, "max_samples": 16,
                "max_length": 32}  # fmt: skip
    spec = demo_merge_spec(demo_dir, tmp_path / "out", [[0.5, 0.5], [0.8, 0.2]], evaluate)
    plan = load_plan(write_spec(tmp_path, spec))
    monkeypatch.setenv("RAYMERGE_TRACKING_TIMEOUT", "150")  # the end waits this long at most
    caplog.set_level(logging.WARNING)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = f"http://raymerge:s3cret-pw@127.0.0.1:{held.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
        started = time.monotonic()
        summary = run_sweep(plan)
        seconds = time.monotonic() - started
    assert summary.done == 2 and summary.failed == 0
    for line in read_manifest(plan.output):
        assert (Path(line["path"]) / MERGE_JSON).is_file()
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
        and ("tracking" in r.getMessage().lower() or "mlflow" in r.getMessage().lower())
    ]  # fmt: skip
    assert len(warnings) == 1, warnings
    assert "cannot be reached" in warnings[0] and "127.0.0.1" in warnings[0], warnings[0]
    printed = capfd.readouterr()
    assert "s3cret-pw" not in warnings[0] + printed.out + printed.err
    # Untracked, this sweep takes seconds; the client's default retries would hold its end
    # for the whole RAYMERGE_TRACKING_TIMEOUT (150 s).
    assert seconds < 75, f"the sweep took {seconds:.0f} s with its tracking server down"


BASE = {
    "base_model": "./base", "adapters": {"a": "./a", "b": "./b"}, "output": "./out",
    "combinations": [{"adapters": ["a", "b"], "weights": [[0.5, 0.5]],
                      "methods": [{"combination_type": "linear"}]}],
}  # fmt: skip


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"mlflow": {"experment": "x"}}, "tracking.mlflow.experment: unknown key"),
        ({"mlfow": {"uri": "http://m:5000"}}, "tracking.mlfow: unknown key"),
        ({"mlflow": {"uri": "http://m:5000", "password": "pw-123"}}, "MLFLOW_TRACKING_PASSWORD"),
        ({"mlflow": {"uri": "http://me:pw-123@m:5000"}}, "MLFLOW_TRACKING_USERNAME"),
        ({"mlflow": {"experiment": ""}}, "tracking.mlflow.experiment"),
    ],
)  # fmt: skip
def test_the_tracking_key_is_strict_and_holds_no_credential(tracking, message):
    with pytest.raises(SpecError) as refused:
        parse_spec({**BASE, "tracking": tracking})
    assert message in str(refused.value)
    assert "pw-123" not in str(refused.value)


def test_tracking_without_mlflow_installed_is_refused_at_plan_time(world, tmp_path, monkeypatch):
    """Asked for in the spec: plan and run refuse it, saying how to install it; turned on by
    MLFLOW_TRACKING_URI alone: a warning (that variable may be set for other tools)."""
    from helpers import base_spec

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    spec = base_spec(world, tmp_path / "out", tracking={"mlflow": {"uri": "http://m:5000"}})
    with pytest.raises(SpecError, match=r"pip install 'raymerge\[mlflow\]'"):
        load_plan(write_spec(tmp_path, spec))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://m:5000")
    plan = load_plan(write_spec(tmp_path, base_spec(world, tmp_path / "out"), "env.yaml"))
    assert any("raymerge[mlflow]" in warning for warning in plan.warnings())
    assert "tracking" not in plan.summary()
