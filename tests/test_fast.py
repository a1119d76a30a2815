"""The fast engine against PEFT's path: same files for every combination type (DARE masks
included), the svd types' factors equal up to each singular vector's sign, and the low-rank SVD
equal to the dense one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    EQUAL_RANK_GROUP,
    PEFT_TYPES,
    PRUNED_SVD_TYPES,
    base_spec,
    best_rank_k,
    relative_error,
    write_spec,
)
from peft import LoraConfig
from safetensors.torch import load_file

from raymerge.cluster.worker import MergeWorker
from raymerge.demo.world import AdapterShape, build_adapter
from raymerge.merge.engines import fast
from raymerge.merge.format import PREFIX
from raymerge.merge.registry import METHODS
from raymerge.merge.tensors import AdapterTensors
from raymerge.store.manifest import merge_dir
from raymerge.sweep.plan import load_plan

GROUPS = [
    EQUAL_RANK_GROUP,
    {  # ranks 8, 4 and 8
        "adapters": ["a", "d", "b"],
        "weights": [[0.7, -0.4, 0.2]],
        "methods": [
            {"combination_type": "cat"},
            {"combination_type": "svd", "svd_rank": [4, 12, 30]},
            {"combination_type": "svd", "svd_clamp": 0.9},
            {
                "combination_type": PRUNED_SVD_TYPES,
                "density": 0.5,
            },
        ],
    },
    {  # rsLoRA and per-module ranks and alphas
        "adapters": ["rs", "pattern"],
        "weights": [[0.8, 0.5]],
        "methods": [{"combination_type": ["cat", "svd"]}],
    },
]


@pytest.fixture(scope="module")
def outputs(world, tmp_path_factory):
    """The same plan merged by both engines, in this process (no Ray needed)."""
    root = tmp_path_factory.mktemp("engines")
    adapters = {name: str(path) for name, path in world.adapters.items()}
    extra = {
        "rs": AdapterShape(r=4, lora_alpha=16, extra={"use_rslora": True}),
        "pattern": AdapterShape(
            r=8, extra={"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 2}}
        ),
    }
    for i, (name, shape) in enumerate(extra.items()):
        adapters[name] = str(build_adapter(world.base_model, root / name, shape, seed=300 + i))
    results = {}
    for engine in ("peft", "fast"):
        spec = base_spec(
            world, root / engine, adapters=adapters, combinations=GROUPS, engine=engine
        )
        plan = load_plan(write_spec(root, spec, f"{engine}.yaml"))
        worker = MergeWorker(0, plan.worker_config())
        for task in plan.tasks():
            result = worker.merge(task)
            assert result.done, result
            assert result.record["engine"] == engine
        results[engine] = plan
    return results


def _files(plan, task):
    folder = Path(merge_dir(plan.output, task.merge_id))
    return load_file(folder / "adapter_model.safetensors"), json.loads(
        (folder / "adapter_config.json").read_text()
    )


def _pairs(outputs):
    return zip(outputs["peft"].tasks(), outputs["fast"].tasks(), strict=True)


def test_both_engines_plan_the_same_merges(outputs):
    assert [t.merge_id for t, _ in _pairs(outputs)] == [t.merge_id for _, t in _pairs(outputs)]
    # equal-rank types + (cat, 3 svd ranks, svd_clamp, the pruned svd types) + (cat, svd)
    expected = len(EQUAL_RANK_GROUP["methods"]) + 5 + len(PRUNED_SVD_TYPES) + 2
    assert len(list(outputs["fast"].tasks())) == expected


def test_fast_writes_the_same_adapter_as_peft_for_all_but_the_low_rank_svd(outputs):
    checked = set()
    for task, same in _pairs(outputs):
        low_rank = task.combination_type == "svd" and task.params["svd_clamp"] is None
        if low_rank:
            continue
        (peft_tensors, peft_config), (fast_tensors, fast_config) = (
            _files(outputs["peft"], task),
            _files(outputs["fast"], same),
        )
        assert fast_config == peft_config, task.combination_type
        assert sorted(fast_tensors) == sorted(peft_tensors)
        for key, want in peft_tensors.items():
            assert fast_tensors[key].shape == want.shape, key
            assert relative_error(fast_tensors[key], want) <= 1e-5, (task.combination_type, key)
        checked.add(task.combination_type)
    # dare_* included: the fast engine draws PEFT's masks from the same seed, in the same order
    assert checked == set(PEFT_TYPES)


def test_deterministic_types_are_byte_identical(outputs):
    for task, same in _pairs(outputs):
        if task.combination_type in ("linear", "cat", "ties", "magnitude_prune"):
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                peft_bytes = Path(
                    merge_dir(outputs["peft"].output, task.merge_id), name
                ).read_bytes()
                fast_bytes = Path(
                    merge_dir(outputs["fast"].output, same.merge_id), name
                ).read_bytes()
                assert fast_bytes == peft_bytes, (task.combination_type, name)


def test_low_rank_svd_equals_the_dense_svd(outputs):
    """Each singular vector may come out with the opposite sign (both factors flip, the delta does
    not); up to that, factors and deltas equal the dense path's."""
    compared = 0
    for task, same in _pairs(outputs):
        if task.combination_type != "svd" or task.params["svd_clamp"] is not None:
            continue
        (peft_tensors, peft_config), (fast_tensors, fast_config) = (
            _files(outputs["peft"], task),
            _files(outputs["fast"], same),
        )
        assert fast_config == peft_config
        for key in peft_tensors:
            if not key.endswith("lora_A.weight"):
                continue
            b_key = key.replace("lora_A", "lora_B")
            a_dense, b_dense = peft_tensors[key], peft_tensors[b_key]
            a_fast, b_fast = fast_tensors[key], fast_tensors[b_key]
            assert a_fast.shape == a_dense.shape and b_fast.shape == b_dense.shape
            delta = b_dense @ a_dense
            assert relative_error(b_fast @ a_fast, delta) <= 1e-5, key
            signs = torch.sign((a_fast * a_dense).sum(dim=1, keepdim=True))
            signs[signs == 0] = 1
            live = b_dense.norm(dim=0) > 1e-4 * b_dense.norm()  # singular values above noise
            # Singular vectors are less well conditioned than the delta: 1e-4.
            assert relative_error(a_fast[live] * signs[live], a_dense[live]) <= 1e-4, key
            assert relative_error(b_fast[:, live] * signs[live].T, b_dense[:, live]) <= 1e-4, key
            compared += 1
    assert compared == 3 * 8 + 8  # 3 svd_rank values on (a, d, b) + (rs, pattern), 8 modules


def test_low_rank_svd_is_the_best_rank_k_approximation():
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q"])
    adapters = [
        AdapterTensors(f"x{i}", config, {"q": (torch.randn(8, 96), torch.randn(80, 8))})
        for i in range(3)
    ]
    weights = [0.5, -1.0, 0.25]
    exact = sum(
        w * (a.factors["q"][1] @ a.factors["q"][0]) * 2.0
        for a, w in zip(adapters, weights, strict=True)
    )
    for rank in (1, 5, 24, 40):
        params = {"svd_rank": rank}
        state, merged = fast.merge_tensors(adapters, weights, METHODS["svd"], params, 0, ["q"])
        lora_a, lora_b = (
            state[f"{PREFIX}q.lora_A.weight"],
            state[f"{PREFIX}q.lora_B.weight"],
        )
        assert lora_a.shape == (min(rank, 80), 96) and merged.r == rank
        assert relative_error(lora_b @ lora_a, best_rank_k(exact, min(rank, 24))) <= 1e-5


def test_embedding_targets_fall_back_to_peft_and_say_why(world, tmp_path):
    shape = AdapterShape(r=4, target_modules=("embed_tokens", "q_proj"))
    adapters = {
        name: str(build_adapter(world.base_model, tmp_path / name, shape, seed=seed))
        for name, seed in (("e1", 1), ("e2", 2))
    }
    spec = base_spec(world, tmp_path / "out", adapters=adapters, engine="fast")
    spec["combinations"][0]["adapters"] = ["e1", "e2"]
    plan = load_plan(write_spec(tmp_path, spec))
    [task] = plan.tasks()
    record = MergeWorker(0, plan.worker_config()).merge(task).record
    assert record["engine"] == "peft"
    assert "embedding targets" in record["engine_fallback"]
