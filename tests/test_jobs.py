"""The example specs in jobs/ stay valid as the spec evolves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raymerge.sweep.plan import load_plan
from raymerge.sweep.spec import load_spec

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


def test_there_are_example_jobs():
    assert {p.name for p in JOBS} >= {"local-demo.yaml", "s3-sweep.yaml", "gpu-pairs-sweep.yaml"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_example_spec_is_valid(job):
    spec = load_spec(job)
    assert spec.combinations and spec.adapters


def test_local_demo_job_plans_against_the_demo_world(demo_dir, tmp_path):
    shutil.copytree(demo_dir, tmp_path / "raymerge-demo")
    (tmp_path / "jobs").mkdir()
    shutil.copy(JOBS[0].parent / "local-demo.yaml", tmp_path / "jobs" / "local-demo.yaml")
    plan = load_plan(tmp_path / "jobs" / "local-demo.yaml")
    # 3 pairs x 2 weightings x (linear + 2 ties + dare_ties) + cat + 2 svd ranks
    assert plan.counts() == {"linear": 6, "ties": 12, "dare_ties": 6, "cat": 1, "svd": 2}
    assert sorted(plan.eval_sets) == ["reverse", "sums", "upper"]
