"""Ray job submission end to end, against a real local Ray head with token authentication."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import base_spec, free_port, wait_for_http, write_spec

from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan


@pytest.fixture(scope="module")
def token_head():
    """`ray start --head --block` on 127.0.0.1 with its own token, free ports and 2 logical GPUs;
    stopped by signalling that process. Yields (job API address, token, client environment)."""
    home = Path(tempfile.mkdtemp(prefix="rm-head-"))  # no ~/.ray/auth_token of the session's
    token = secrets.token_hex(24)
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # Its session files, ray_current_cluster included, stay out of /tmp/ray: a head killed by a
    # signal leaves that file behind, and a later plain ray.init() would try to join it.
    env["RAY_TMPDIR"] = str(home / "ray")
    # The cluster's Python is this one (as in an image with raymerge installed).
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    command = [f"{bin_dir}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    command += [f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    command += [f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}"]
    command += [f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}"]
    command += [f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2", "--num-gpus=2"]
    log = open(home / "head.log", "w")  # noqa: SIM115 (the head writes it until teardown)
    head = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_http(f"{address}/api/version", head, 120, "the Ray head", accept_http_errors=True)
    finally:
        if head.poll() is not None:
            print((home / "head.log").read_text()[-3000:])
    client_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    yield address, token, client_env
    head.terminate()
    try:  # a graceful stop of every Ray process takes half a minute; ten seconds are enough
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)  # the head and the Ray processes it started
        head.wait(timeout=30)
    log.close()


def _raymerge(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raymerge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_submit_follow_runs_the_sweep_on_a_token_cluster(world, token_head, tmp_path):
    address, token, env = token_head
    spec = base_spec(world, tmp_path / "out", workers=1)
    spec["combinations"][0]["methods"] = [{"combination_type": ["linear", "cat"]}]
    path = write_spec(tmp_path, spec)
    result = _raymerge(
        "submit", str(path), "--address", address, "--follow", env={**env, "RAY_AUTH_TOKEN": token}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "SUCCEEDED" in output and "Sweep summary" in output
    assert token not in output
    job_id = next(w for w in result.stdout.split() if w.startswith("raysubmit_"))
    plan = load_plan(path)
    lines = read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines) == sorted(t.merge_id for t in plan.tasks())
    assert all(line["status"] == "done" for line in lines)
    state = _raymerge("status", job_id, "--address", address, env={**env, "RAY_AUTH_TOKEN": token})
    assert state.returncode == 0 and "SUCCEEDED" in state.stdout


def test_a_submission_without_the_token_is_refused_clearly(world, token_head, tmp_path):
    address, _, env = token_head
    path = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    result = _raymerge("submit", str(path), "--address", address, env=env)
    assert result.returncode == 1
    assert "requires its authentication token" in result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_invalid_spec_is_refused_before_submission_and_bad_inputs_fail_the_job(
    world, token_head, tmp_path
):
    address, token, env = token_head
    env = {**env, "RAY_AUTH_TOKEN": token}
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["methods"] = [{"combination_type": "avg"}]
    result = _raymerge("submit", str(write_spec(tmp_path, spec)), "--address", address, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown combination type 'avg'" in result.stderr
    assert "raysubmit_" not in result.stdout  # refused here: nothing was shipped

    # Inputs are checked on the cluster, where they are read: the job fails, saying why.
    spec = base_spec(world, tmp_path / "out")
    spec["adapters"]["b"] = str(tmp_path / "not-on-the-cluster")
    path = write_spec(tmp_path, spec, "inputs.yaml")
    result = _raymerge("submit", str(path), "--address", address, "--follow", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "adapter 'b'" in output and "does not exist" in output
    assert "FAILED" in output
    assert not (tmp_path / "out").exists()
    job_id = next(w for w in result.stdout.split() if w.startswith("raysubmit_"))
    logs = _raymerge("logs", job_id, "--address", address, env=env)
    assert "adapter 'b'" in logs.stdout
    assert token not in json.dumps(logs.stdout)
