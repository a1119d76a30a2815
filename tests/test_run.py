"""End to end on a real local Ray instance (2 workers on logical GPUs, executing on the CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    EQUAL_RANK_GROUP,
    PEFT_TYPES,
    RANK_CHANGING_TYPES,
    assert_matches_peft,
    base_spec,
    methods_for,
    reload_merged,
    write_spec,
)
from peft.tuners.lora import LoraLayer

from raymerge.cluster.driver import run_sweep
from raymerge.cluster.worker import MergeWorker
from raymerge.cluster.workers import check_resources
from raymerge.errors import ClusterError, InputError
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

ALL_TYPES_SPEC = [
    EQUAL_RANK_GROUP,
    # Rank-changing types over adapters of ranks 8 and 4.
    {
        "adapters": ["a", "d"],
        "weights": [[0.7, -0.4]],
        "methods": [
            *methods_for(RANK_CHANGING_TYPES, density=0.5, svd_rank=6),
            {"combination_type": "svd", "svd_clamp": 0.9},
        ],
    },
]
"""Every PEFT type in the registry, at least once."""


@pytest.fixture(scope="module", params=["peft", "fast"])
def sweep(request, world, ray_cluster, tmp_path_factory):
    """One sweep covering all 11 combination types, run once per engine for this module."""
    root = tmp_path_factory.mktemp("sweep")
    spec = base_spec(
        world, root / "out", combinations=ALL_TYPES_SPEC, engine=request.param, workers=2
    )
    plan = load_plan(write_spec(root, spec))
    summary = run_sweep(plan)
    return plan, summary


def _records(output: str) -> dict[str, dict]:
    return {
        path.parent.name: json.loads(path.read_text())
        for path in Path(output, "merges").glob("*/merge.json")
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_json_records_provenance(sweep, world):
    plan, _ = sweep
    for merge_id, record in _records(plan.output).items():
        for entry in record["adapters"]:
            folder = world.adapters[entry["name"]]
            assert entry["uri"] == str(folder)
            assert entry["weights_sha256"] == _sha256(folder / "adapter_model.safetensors")
            assert entry["config_sha256"] == _sha256(folder / "adapter_config.json")
        for name, digest in record["files"].items():
            assert digest["sha256"] == _sha256(Path(plan.output, "merges", merge_id, name))
        assert set(record["versions"]) == {"raymerge", "peft", "torch", "transformers"}
        assert (record["compute_dtype"], record["output_dtype"]) == ("float32", "float32")
        assert record["engine"] == plan.spec.engine and record["seconds"] > 0
        assert isinstance(record["merge_seed"], int)


def test_sweep_completes_with_manifest_and_summary(sweep):
    plan, summary = sweep
    planned = sum(1 for _ in plan.tasks())
    assert planned == len(PEFT_TYPES) + 1  # every type, and svd once more with svd_clamp
    assert (summary.done, summary.failed, summary.skipped) == (planned, 0, 0)
    records = _records(plan.output)
    assert sorted(records) == sorted(t.merge_id for t in plan.tasks())
    lines = read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines) == sorted(records)
    for line in lines:
        record = records[line["merge_id"]]
        assert line["status"] == record["status"] == "done"
        assert line["path"] == str(Path(plan.output, "merges", line["merge_id"]))
        for key in ("weights", "combination_type", "params", "seed"):
            assert line[key] == record[key]
        assert line["adapters"] == [
            {"name": a["name"], "uri": a["uri"], "weights_sha256": a["weights_sha256"]}
            for a in record["adapters"]
        ]
    # Both workers took part, and each loaded an adapter at most once.
    assert {r["worker"]["index"] for r in records.values()} == {0, 1}
    assert set(summary.workers) == {"0", "1"}
    assert all(1 <= w.adapter_loads <= 4 for w in summary.workers.values())
    assert summary.adapter_loads == sum(w.adapter_loads for w in summary.workers.values())
    assert sum(line["adapter_loads"] for line in lines) == summary.adapter_loads
    assert summary.bytes_written == sum(line["bytes"] for line in lines) > 0
    assert summary.retries == 0
    saved = json.loads(Path(plan.output, "summary.json").read_text())
    assert saved["done"] == planned and saved["failed"] == 0


@pytest.mark.parametrize("combination_type", PEFT_TYPES)
def test_output_equals_add_weighted_adapter_on_a_peft_model(sweep, world, combination_type):
    plan, _ = sweep
    records = [
        r for r in _records(plan.output).values() if r["combination_type"] == combination_type
    ]
    assert records, f"no {combination_type} merge in the sweep"
    for record in records:
        names = [a["name"] for a in record["adapters"]]
        assert [a["uri"] for a in record["adapters"]] == [str(world.adapters[n]) for n in names]
        assert_matches_peft(
            world.base_model,
            [world.adapters[n] for n in names],
            record,
            Path(plan.output, "merges", record["merge_id"]),
            rel=1e-6,
            svd_delta_rel=1e-5,
        )


def test_cat_delta_is_the_exact_weighted_sum(sweep, world):
    """Independently of PEFT's merge code: cat's delta is sum_i w_i * scale_i * B_i @ A_i."""
    plan, _ = sweep
    [record] = [r for r in _records(plan.output).values() if r["combination_type"] == "cat"]
    merged = reload_merged(world.base_model, Path(plan.output, "merges", record["merge_id"]))
    inputs = {}
    for name in ("a", "d"):
        model = reload_merged(world.base_model, world.adapters[name])
        inputs[name] = {
            key: module.get_delta_weight("merged")
            for key, module in model.named_modules()
            if isinstance(module, LoraLayer) and "merged" in module.lora_A
        }
    checked = 0
    for key, module in merged.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            want = sum(
                w * inputs[n][key] for n, w in zip(("a", "d"), record["weights"], strict=True)
            )
            got = module.get_delta_weight("merged")
            assert (got - want).norm() / want.norm() <= 1e-5, key
            checked += 1
    assert checked == 8  # q/k/v/o in 2 layers


def test_resume_skips_committed_merges_and_redoes_incomplete_ones(world, ray_cluster, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["methods"] = [
        {"combination_type": ["linear", "dare_linear"], "density": [0.3, 0.6]}
    ]
    plan = load_plan(write_spec(tmp_path, spec))
    first = run_sweep(plan)
    assert (first.done, first.skipped) == (3, 0)
    merges = Path(plan.output, "merges")
    ids = sorted(p.name for p in merges.iterdir())
    stamps = {i: (merges / i / "adapter_model.safetensors").stat().st_mtime_ns for i in ids}

    # A merge interrupted before its commit marker, and a manifest lost with the driver.
    (merges / ids[0] / "merge.json").unlink()
    Path(plan.output, "manifest.jsonl").unlink()

    second = run_sweep(plan)
    assert (second.done, second.skipped, second.failed) == (1, 2, 0)
    after = {i: (merges / i / "adapter_model.safetensors").stat().st_mtime_ns for i in ids}
    assert after[ids[0]] != stamps[ids[0]]  # redone
    assert {i: after[i] for i in ids[1:]} == {i: stamps[i] for i in ids[1:]}  # untouched
    lines = read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines) == ids
    assert all(line["status"] == "done" for line in lines)

    third = run_sweep(plan)
    assert (third.done, third.skipped) == (0, 3)
    assert len(read_manifest(plan.output)) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="svd_driver merges succeed on CUDA")
def test_failed_merge_is_recorded_never_listed_as_done_and_exits_1(world, ray_cluster, tmp_path):
    # A logical GPU on a CPU-only torch: the plan takes svd_driver (a cuSOLVER driver, CUDA
    # only), and this merge fails on the worker.
    spec = base_spec(world, tmp_path / "out", gpus_per_worker=1)
    spec["combinations"][0]["methods"] = [
        {"combination_type": "linear"},
        {"combination_type": "svd", "svd_driver": "gesvd"},
    ]
    path = write_spec(tmp_path, spec)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    result = subprocess.run(
        [sys.executable, "-m", "raymerge.cli", "run", str(path), "--workers", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "driver" in result.stdout + result.stderr
    lines = {line["combination_type"]: line for line in read_manifest(str(tmp_path / "out"))}
    assert lines["linear"]["status"] == "done"
    assert lines["svd"]["status"] == "failed" and "driver" in lines["svd"]["error"]
    assert not Path(tmp_path, "out", "merges", lines["svd"]["merge_id"]).exists()
    summary = json.loads(Path(tmp_path, "out", "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (1, 1)


def test_too_many_gpus_is_a_clear_error_before_anything_runs(world, ray_cluster, tmp_path):
    """A local instance cannot grow: the driver checks the workers fit before starting any."""
    spec = base_spec(world, tmp_path / "out", workers=2, gpus_per_worker=4)
    plan = load_plan(write_spec(tmp_path, spec))
    with pytest.raises(ClusterError) as caught:
        check_resources(plan.spec)  # on the session's instance: 2 CPU, 2 GPU
    message = str(caught.value)
    assert "workers=2 need 2 CPU and 8 GPU (cpus_per_worker=1, gpus_per_worker=4)" in message
    assert "this Ray instance has 2 CPU and 2 GPU" in message and "gpus_per_worker: 0" in message
    assert not Path(tmp_path, "out").exists()


def test_dare_merges_are_reproducible(world, ray_cluster, tmp_path):
    """One spec, two outputs: identical DARE adapter bytes (per-merge seeds); new seed differs.
    The first run is a sweep on a Ray worker, the others merge in this process (a new worker)."""
    dare = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
    spec = base_spec(world, tmp_path / "one")
    spec["combinations"][0]["methods"] = [{"combination_type": dare, "density": 0.5}]
    one = load_plan(write_spec(tmp_path, spec))
    two = load_plan(write_spec(tmp_path, spec), {"output": str(tmp_path / "two")})
    three = load_plan(write_spec(tmp_path, {**spec, "seed": 1}, name="three.yaml"))
    assert run_sweep(one).done == 4
    threads = torch.get_num_threads()  # a worker sets its own
    try:
        for plan in (two, three):
            worker = MergeWorker(0, plan.worker_config())
            assert all(worker.merge(task).done for task in plan.tasks())
    finally:
        torch.set_num_threads(threads)
    for task, other_seed in zip(one.tasks(), three.tasks(), strict=True):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            first, second = (Path(p.output, "merges", task.merge_id, name) for p in (one, two))
            assert first.read_bytes() == second.read_bytes(), (task.combination_type, name)
        record = json.loads(Path(one.output, "merges", task.merge_id, "merge.json").read_text())
        assert record["merge_seed"] == task.merge_seed and record["seed"] == 0
        ours = Path(one.output, "merges", task.merge_id, "adapter_model.safetensors")
        reseeded = Path(three.output, "merges", other_seed.merge_id, "adapter_model.safetensors")
        assert reseeded.read_bytes() != ours.read_bytes(), task.combination_type


def test_a_merge_only_sweep_needs_no_base_weights(world, ray_cluster, tmp_path):
    """The fast engine never reads a base weight: a base model folder with only its config.json
    merges exactly as the full one does; sweeps that need the weights are refused at plan time."""
    bare = tmp_path / "base-without-weights"
    bare.mkdir()
    (bare / "config.json").write_bytes((world.base_model / "config.json").read_bytes())
    spec = base_spec(world, tmp_path / "out", base_model=str(bare), workers=1)
    spec["combinations"][0]["methods"] = [{"combination_type": ["linear", "svd"]}]
    plan = load_plan(write_spec(tmp_path, spec))
    summary = run_sweep(plan)
    assert (summary.done, summary.failed) == (2, 0)
    for line in read_manifest(plan.output):
        record = json.loads(Path(line["path"], "merge.json").read_text())
        adapters = [world.adapters["a"], world.adapters["b"]]
        assert_matches_peft(
            world.base_model, adapters, record, Path(line["path"]), rel=1e-6, svd_delta_rel=1e-5
        )

    spec["engine"] = "peft"
    with pytest.raises(InputError) as caught:
        load_plan(write_spec(tmp_path, spec))
    assert f"base_model {bare}: has config.json but no weights" in str(caught.value)
    assert "`engine: peft` needs" in str(caught.value)


def test_worker_that_cannot_load_the_base_model_is_a_clear_error(world, ray_cluster, tmp_path):
    broken = tmp_path / "base-with-broken-weights"
    broken.mkdir()
    (broken / "config.json").write_bytes((world.base_model / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    spec = base_spec(world, tmp_path / "out", base_model=str(broken), workers=1, engine="peft")
    plan = load_plan(write_spec(tmp_path, spec))
    with pytest.raises(ClusterError) as caught:
        run_sweep(plan, start_timeout=120)
    assert "merge worker failed to start" in str(caught.value)
    assert str(broken) in str(caught.value)
    assert not Path(tmp_path, "out", "merges").exists()
