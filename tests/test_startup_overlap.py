"""A run that starts Ray checks its plan meanwhile: the two overlap, the plan's errors are
reported before Ray's, a run whose one worker runs in this process starts no Ray, and a session
opened inside the CLI's knows the local instance is of fixed size. No real Ray is started here
(`ray_session` is replaced); tests/test_startup.py runs the whole CLI, on Ray and without."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest
from helpers import base_spec, write_spec

import raymerge.cluster.session as session
import raymerge.cluster.startup as startup
from raymerge.errors import ClusterError, InputError, SpecError


@pytest.fixture
def no_ray_yet(monkeypatch):
    """This process as a fresh `raymerge run`: not connected to Ray, no RAY_ADDRESS."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _fake_session(monkeypatch, *, fail: bool = False, during=None) -> list[str]:
    """Replace `ray_session` with one that records its start and stop (or fails to start)."""
    events: list[str] = []

    @contextlib.contextmanager
    def fake(address):
        events.append("start")
        if during is not None:
            during()
        if fail:
            raise ClusterError("cannot connect to Ray at nowhere: refused")
        try:
            yield True
        finally:
            events.append("stop")

    monkeypatch.setattr(session, "ray_session", fake)
    return events


def test_the_plan_is_checked_while_ray_starts(world, tmp_path, monkeypatch, no_ray_yet):
    spec = write_spec(tmp_path, base_spec(world, tmp_path / "out", workers=2))
    checking, ray_started = threading.Event(), threading.Event()
    real_load = startup.load_plan

    def load_plan(*args):
        checking.set()
        assert ray_started.wait(15), "the plan was checked before Ray started, not beside it"
        return real_load(*args)

    def ray_starting():
        assert checking.wait(15), "Ray started before the plan was being checked"
        ray_started.set()

    monkeypatch.setattr(startup, "load_plan", load_plan)
    events = _fake_session(monkeypatch, during=ray_starting)
    with startup.plan_while_ray_starts(spec, {}, address=None, use_ray=None) as plan:
        assert plan.spec.workers == 2 and events == ["start"]
    assert events == ["start", "stop"]


def test_one_local_worker_starts_no_ray(world, tmp_path, monkeypatch, no_ray_yet):
    spec = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    events = _fake_session(monkeypatch)
    with startup.plan_while_ray_starts(spec, {}, address=None, use_ray=None) as plan:
        assert plan.spec.workers == 1
    assert events == []
    with startup.plan_while_ray_starts(spec, {}, address=None, use_ray=True):  # --ray
        assert events == ["start"]
    with startup.plan_while_ray_starts(spec, {"workers": 2}, address=None, use_ray=None):
        assert events == ["start", "stop", "start"]  # a CLI override counts
    with startup.plan_while_ray_starts(spec, {}, address="ray://head:10001", use_ray=None):
        assert events[-1] == "start"


def test_the_plans_errors_come_before_rays(world, tmp_path, monkeypatch, no_ray_yet):
    missing = base_spec(world, tmp_path / "out", workers=2)
    missing["adapters"]["b"] = str(tmp_path / "no-such-adapter")
    spec = write_spec(tmp_path, missing, "missing.yaml")
    events = _fake_session(monkeypatch, fail=True)
    with pytest.raises(InputError, match="no-such-adapter"):
        with startup.plan_while_ray_starts(spec, {}, address=None, use_ray=None):
            pytest.fail("no plan for a spec with a missing input")
    assert events == ["start"]
    good = write_spec(tmp_path, base_spec(world, tmp_path / "out", workers=2), "good.yaml")
    with pytest.raises(ClusterError, match="cannot connect"):
        with startup.plan_while_ray_starts(good, {}, address=None, use_ray=None):
            pytest.fail("no run without Ray")
    events.clear()
    bad = write_spec(tmp_path, {**base_spec(world, tmp_path / "out"), "workers": "many"}, "b.yaml")
    with pytest.raises(SpecError, match="workers"):
        with startup.plan_while_ray_starts(bad, {}, address=None, use_ray=None):
            pytest.fail("no plan for a spec that does not parse")
    assert events == []  # a spec that does not parse starts nothing


def test_a_session_inside_a_local_one_knows_its_size_is_fixed(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for started_here in (False, True):
        monkeypatch.setattr(session, "_started_locally", started_here)
        with session.ray_session(None) as fixed_size:
            assert fixed_size is started_here


def test_a_one_worker_cli_run_never_imports_ray(world, tmp_path):
    """The whole `raymerge run` of one local worker: merged, and Ray not even imported."""
    spec = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    code = (
        "import sys\n"
        "from raymerge.cli.app import app\n"
        "try:\n"
        f"    app(['run', {str(spec)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('RAY IMPORTED' if 'ray' in sys.modules else 'NO RAY')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_XDIST_WORKER")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO RAY"), done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["executor"] == "in-process" and summary["done"] == 1
