"""Conformance: what `raymerge run` writes, reloaded with PeftModel.from_pretrained, equals PEFT's
own add_weighted_adapter and, independently of PEFT, the math (cat: the exact weighted sum of the
input deltas; svd: its best rank-k approximation). Includes the cases where plain PEFT is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    PRUNED_SVD_TYPES,
    assert_matches_peft,
    base_spec,
    best_rank_k,
    cast_adapter_file,
    compare_merge,
    is_low_rank_svd,
    lora_deltas,
    reference_merge,
    relative_error,
    reload_merged,
    weighted_sum,
    write_spec,
)
from safetensors import safe_open

from raymerge.cluster.driver import run_sweep
from raymerge.demo.world import AdapterShape, build_adapter
from raymerge.sweep.plan import load_plan

FEATURE_ADAPTERS = {
    "rs1": AdapterShape(r=4, lora_alpha=16, extra={"use_rslora": True}),
    "rs2": AdapterShape(r=4, lora_alpha=16, extra={"use_rslora": True}),
    "pattern": AdapterShape(
        r=8, lora_alpha=16, extra={"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 4}}
    ),
    "emb1": AdapterShape(r=4, lora_alpha=8, target_modules=("embed_tokens", "q_proj")),
    "emb2": AdapterShape(r=4, lora_alpha=16, target_modules=("embed_tokens", "q_proj")),
}

GROUPS = [
    # rsLoRA: PEFT's own merge is off by sqrt(r); raymerge's must be exact.
    {
        "adapters": ["rs1", "rs2"],
        "weights": [[0.8, -0.5]],
        "methods": [
            {"combination_type": ["cat", "linear"]},
            {"combination_type": "svd", "svd_rank": 4},
        ],
    },
    # Per-module ranks and alphas.
    {
        "adapters": ["pattern", "a"],
        "weights": [[0.6, 0.4]],
        "methods": [{"combination_type": "cat"}, {"combination_type": "svd", "svd_rank": 6}],
    },
    # Embedding targets.
    {
        "adapters": ["emb1", "emb2"],
        "weights": [[1.0, 0.5]],
        "methods": [{"combination_type": "cat"}, {"combination_type": "svd", "svd_rank": 4}],
    },
    # More than two adapters, different ranks, a negative weight, lora_alpha != r.
    {
        "adapters": ["a", "d", "b"],
        "weights": [[0.5, -0.7, 0.3]],
        "methods": [
            {"combination_type": "cat"},
            {"combination_type": "svd", "svd_rank": 10},
            {
                "combination_type": PRUNED_SVD_TYPES,
                "density": 0.5,
            },
        ],
    },
    # Adapters stored in bfloat16: the merge runs in float32 and is written in bfloat16.
    {
        "adapters": ["h1", "h2"],
        "weights": [[0.7, 0.3]],
        "methods": [{"combination_type": ["linear", "svd"]}],
    },
]


@pytest.fixture(scope="module", params=["peft", "fast"])
def features(request, world, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    paths = dict(world.adapters)
    for i, (name, shape) in enumerate(FEATURE_ADAPTERS.items()):
        paths[name] = build_adapter(world.base_model, root / name, shape, seed=100 + i)
    paths["h1"] = cast_adapter_file(world.adapters["a"], root / "h1", torch.bfloat16)
    paths["h2"] = cast_adapter_file(world.adapters["b"], root / "h2", torch.bfloat16)
    spec = base_spec(
        world,
        root / "out",
        adapters={name: str(path) for name, path in paths.items()},
        combinations=GROUPS,
        engine=request.param,
    )
    plan = load_plan(write_spec(root, spec))
    summary = run_sweep(plan)
    assert summary.failed == 0, summary.failures
    records = [json.loads(p.read_text()) for p in Path(plan.output, "merges").glob("*/merge.json")]
    return paths, plan, records


def _merges(features, adapters: list[str], combination_type: str) -> list[dict]:
    _, _, records = features
    found = [
        r
        for r in records
        if [a["name"] for a in r["adapters"]] == adapters
        and r["combination_type"] == combination_type
    ]
    assert found, (adapters, combination_type)
    return found


def _merged_dir(features, record) -> Path:
    return Path(features[1].output, "merges", record["merge_id"])


CONFORMANCE = [
    (["rs1", "rs2"], "cat"),
    (["rs1", "rs2"], "linear"),
    (["rs1", "rs2"], "svd"),
    (["pattern", "a"], "cat"),
    (["pattern", "a"], "svd"),
    (["emb1", "emb2"], "cat"),
    (["emb1", "emb2"], "svd"),
    (["a", "d", "b"], "cat"),
    (["a", "d", "b"], "svd"),
    (["a", "d", "b"], "ties_svd"),
    (["a", "d", "b"], "dare_linear_svd"),
    (["a", "d", "b"], "dare_ties_svd"),
    (["a", "d", "b"], "magnitude_prune_svd"),
]


@pytest.mark.parametrize(("adapters", "combination_type"), CONFORMANCE)
def test_tensors_equal_peft(features, world, adapters, combination_type):
    paths = features[0]
    for record in _merges(features, adapters, combination_type):
        assert_matches_peft(
            world.base_model,
            [paths[n] for n in adapters],
            record,
            _merged_dir(features, record),
            rel=1e-6,
            svd_delta_rel=1e-5,
        )


EXACT = [case for case in CONFORMANCE if case[1] in ("cat", "svd")]


@pytest.mark.parametrize(("adapters", "combination_type"), EXACT)
def test_reloaded_delta_equals_the_math(features, world, adapters, combination_type):
    """cat: sum_i w_i * dW_i exactly; svd: the best rank-k approximation of that sum."""
    paths = features[0]
    inputs = [lora_deltas(reload_merged(world.base_model, paths[n]), "merged") for n in adapters]
    [record] = _merges(features, adapters, combination_type)
    merged = lora_deltas(reload_merged(world.base_model, _merged_dir(features, record)), "merged")
    assert set(merged) == set().union(*inputs)
    for key, delta in merged.items():
        exact = weighted_sum(inputs, record["weights"], key)
        if combination_type == "svd":
            exact = best_rank_k(exact, record["params"]["svd_rank"])
        assert relative_error(delta, exact) <= 1e-5, key


def test_rslora_plain_peft_is_wrong_and_raymerge_is_exact(features, world, tmp_path):
    """The silent-wrong case itself: PEFT's saved cat merge of rsLoRA adapters is off by sqrt(r)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = features[0]
    inputs = [
        lora_deltas(reload_merged(world.base_model, paths[n]), "merged") for n in ("rs1", "rs2")
    ]
    weights = [0.8, -0.5]

    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world.base_model), paths["rs1"], adapter_name="rs1"
    )
    plain.load_adapter(paths["rs2"], adapter_name="rs2")
    plain.add_weighted_adapter(["rs1", "rs2"], weights, "m", combination_type="cat")
    plain.save_pretrained(tmp_path, selected_adapters=["m"])
    plain_deltas = lora_deltas(reload_merged(world.base_model, tmp_path / "m"), "merged")

    [record] = _merges(features, ["rs1", "rs2"], "cat")
    ours_dir = _merged_dir(features, record)
    ours = lora_deltas(reload_merged(world.base_model, ours_dir), "merged")
    for key in ours:
        exact = weighted_sum(inputs, weights, key)
        assert relative_error(plain_deltas[key], exact) > 0.5  # PEFT: sqrt(8) - 1 = 183% off
        assert relative_error(ours[key], exact) <= 1e-5
    config = json.loads((ours_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 8


def test_rslora_linear_reloads_with_unit_scaling(features, world):
    [record] = _merges(features, ["rs1", "rs2"], "linear")
    model = reload_merged(world.base_model, _merged_dir(features, record))
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "merged" in m.lora_A]
    assert layers and all(m.scaling["merged"] == 1.0 for m in layers)


def test_bfloat16_adapters_merge_in_float32_and_are_written_in_bfloat16(features, world):
    paths = features[0]
    for combination_type in ("linear", "svd"):
        [record] = _merges(features, ["h1", "h2"], combination_type)
        assert (record["compute_dtype"], record["output_dtype"]) == ("float32", "bfloat16")
        merged_file = _merged_dir(features, record) / "adapter_model.safetensors"
        with safe_open(str(merged_file), framework="pt") as f:
            written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        assert {t.dtype for t in written.values()} == {torch.bfloat16}
        # The float32 merge of the same (bf16-valued) inputs, rounded once to bf16.
        expected = reference_merge(
            world.base_model,
            [paths["h1"], paths["h2"]],
            record["weights"],
            combination_type,
            record["params"],
            seed=record["merge_seed"],
        )
        expected = {k.replace(".merged", ""): v.float() for k, v in expected.items()}
        if is_low_rank_svd(record):  # bf16 rounding of the factors: 1e-2
            written = {k: v.float() for k, v in written.items()}
            compare_merge(written, expected, record, rel=1e-2, svd_delta_rel=1e-2)
            continue
        for key, tensor in expected.items():
            assert torch.equal(written[key], tensor.to(torch.bfloat16)), key
