"""Checks that need real GPUs: skipped where CUDA is absent (as on the CI machines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_matches_peft, base_spec, write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

requires_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (none on this machine)"
)


@requires_two_gpus
def test_a_worker_shards_the_base_model_over_its_gpus(world, tmp_path):
    import ray

    from raymerge.cluster.workers import start_workers

    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, ignore_reinit_error=True)
    spec = base_spec(
        world, tmp_path / "out", workers=1, gpus_per_worker=2, gpu_headroom_gb=0, engine="peft"
    )
    plan = load_plan(write_spec(tmp_path, spec))
    workers, groups, _ = start_workers(plan, 600, fixed_size=True)
    info = ray.get(workers[0].info.remote())
    # device_map="auto" balances the layers over the worker's visible GPUs.
    assert {"cuda:0", "cuda:1"} <= set(info["devices"])
    for worker in workers.values():
        ray.kill(worker, no_restart=True)
    for group in groups:
        ray.util.remove_placement_group(group)
    summary = run_sweep(plan)
    assert summary.failed == 0 and summary.done == 1


requires_a_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
)


@requires_a_gpu
def test_a_merge_only_worker_merges_on_its_gpu_without_base_weights(world, tmp_path):
    import ray

    from raymerge.cluster.workers import start_workers

    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, ignore_reinit_error=True)
    spec = base_spec(world, tmp_path / "out", workers=1, gpus_per_worker=1)
    spec["combinations"][0]["methods"] = [{"combination_type": ["linear", "cat", "svd"]}]
    plan = load_plan(write_spec(tmp_path, spec))
    workers, groups, _ = start_workers(plan, 600, fixed_size=True)
    info = ray.get(workers[0].info.remote())
    assert info["compute_device"] == "cuda:0" and info["base_loaded"] is False
    for worker in workers.values():
        ray.kill(worker, no_restart=True)
    for group in groups:
        ray.util.remove_placement_group(group)
    summary = run_sweep(plan)
    assert summary.failed == 0 and summary.done == 3
    for line in read_manifest(plan.output):
        record = json.loads(Path(line["path"], "merge.json").read_text())
        adapters = [world.adapters["a"], world.adapters["b"]]
        # float32 on the GPU against PEFT on the CPU: equal to rounding.
        assert_matches_peft(
            world.base_model, adapters, record, Path(line["path"]), rel=1e-5, svd_delta_rel=1e-5
        )
