"""Adapters that PEFT would merge silently wrong, and unsafe or broken inputs: each is refused at
plan time with a message naming the adapter, the feature or file, and what to do instead."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_matches_peft,
    base_spec,
    compare_merge,
    reference_merge,
    write_spec,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from raymerge.cluster.worker import MergeWorker
from raymerge.demo.world import AdapterShape, build_adapter, build_base_model
from raymerge.errors import InputError, SpecError
from raymerge.store.manifest import merge_dir
from raymerge.sweep.plan import load_plan


def _problems(tmp_path: Path, spec: dict) -> list[str]:
    with pytest.raises((InputError, SpecError)) as caught:
        load_plan(write_spec(tmp_path, spec))
    return caught.value.problems


def _spec_with(world, tmp_path, name: str, path: Path, method=None, **overrides):
    spec = base_spec(world, tmp_path / "out", **overrides)
    spec["adapters"][name] = str(path)
    spec["combinations"] = [
        {
            "adapters": ["a", name],
            "weights": [[0.5, 0.5]],
            "methods": [method or {"combination_type": "cat"}],
        }
    ]
    return spec


def _edit_config(path: Path, **changes) -> Path:
    config = path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return path


def _plain_peft_merges_silently(world, path: Path) -> None:
    """Plain PEFT: add_weighted_adapter accepts the adapter without a word."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world.base_model), world.adapters["a"], "a"
    )
    model.load_adapter(path, adapter_name="x")
    model.add_weighted_adapter(["a", "x"], [0.5, 0.5], "m", combination_type="cat")
    assert "m" in model.peft_config


SILENT_WRONG = {
    "dora": ({"use_dora": True}, ["adapter 'x' uses DoRA", "magnitude", "merge_and_unload"]),
    "lora_bias": ({"lora_bias": True}, ["adapter 'x' uses lora_bias", "drops LoRA biases"]),
    "modules_to_save": (
        {"modules_to_save": ["lm_head"]},
        ["adapter 'x' uses modules_to_save ['lm_head']", "loses the trained one"],
    ),
}


@pytest.mark.parametrize("feature", sorted(SILENT_WRONG))
def test_features_plain_peft_merges_silently_wrong_are_refused(world, tmp_path, feature):
    extra, expected = SILENT_WRONG[feature]
    path = build_adapter(world.base_model, tmp_path / "x", AdapterShape(r=8, extra=extra), seed=7)
    _plain_peft_merges_silently(world, path)
    problems = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert any(all(part in p for part in expected) for p in problems), problems
    assert not (tmp_path / "out").exists()


CONFIG_REFUSALS = {
    "target_parameters": (
        {"target_parameters": ["mlp.gate_proj.weight"]},
        "target_parameters ['mlp.gate_proj.weight']",
    ),
    "pissa": ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
    "trainable tokens": ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    "rank mismatch": ({"r": 4}, "has rank 8 but adapter_config.json says 4"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_config_features_are_refused(world, tmp_path, case):
    changes, expected = CONFIG_REFUSALS[case]
    path = _edit_config(shutil.copytree(world.adapters["b"], tmp_path / "x"), **changes)
    problems = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert any("adapter 'x'" in p and expected in p for p in problems), problems


def test_rank_pattern_is_refused_for_equal_rank_types_and_merged_by_cat(world, tmp_path):
    path = build_adapter(
        world.base_model,
        tmp_path / "x",
        AdapterShape(r=8, extra={"rank_pattern": {"q_proj": 4}}),
        seed=8,
    )
    spec = _spec_with(world, tmp_path, "x", path, {"combination_type": "linear"})
    [problem] = _problems(tmp_path, spec)
    assert "adapter 'x' has per-module ranks (rank_pattern)" in problem
    assert "use cat or an svd type" in problem
    spec = _spec_with(world, tmp_path, "x", path, {"combination_type": ["cat", "svd"]})
    assert load_plan(write_spec(tmp_path, spec)).counts() == {"cat": 1, "svd": 1}


def test_pickle_adapter_is_refused_unless_allowed_then_loaded_safely(world, tmp_path):
    path = shutil.copytree(world.adapters["b"], tmp_path / "x")
    weights = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(weights, path / "adapter_model.bin")
    spec = _spec_with(world, tmp_path, "x", path, {"combination_type": "linear"})
    [problem] = _problems(tmp_path, spec)
    assert "adapter 'x'" in problem and "adapter_model.bin" in problem
    assert "allow_pickle: true" in problem

    spec["allow_pickle"] = True
    plan = load_plan(write_spec(tmp_path, spec))
    [task] = plan.tasks()
    result = _worker(world, plan).merge(task)
    assert result.done, result
    assert result.record["adapters"][1]["weights_file"] == "adapter_model.bin"
    merged_dir = Path(merge_dir(plan.output, task.merge_id))
    adapters = [world.adapters["a"], path]
    assert_matches_peft(
        world.base_model, adapters, result.record, merged_dir, rel=1e-6, svd_delta_rel=1e-5
    )


def _worker(world, plan) -> MergeWorker:
    """A merge worker in this process (no Ray), for checks that need its internals."""
    return MergeWorker(0, plan.worker_config())


def test_truncated_safetensors_is_named(world, tmp_path):
    path = shutil.copytree(world.adapters["b"], tmp_path / "x")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    [problem] = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert "adapter 'x'" in problem and "adapter_model.safetensors is truncated" in problem


def test_wrong_shape_tensor_is_named(world, tmp_path):
    path = shutil.copytree(world.adapters["b"], tmp_path / "x")
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(8, 48)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    [problem] = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert "adapter 'x': model.layers.1.self_attn.v_proj has lora_A [8, 48]" in problem
    assert "model.layers.1.self_attn.v_proj.weight of shape [64, 64]" in problem


def test_adapter_for_another_model_is_named(world, tmp_path):
    deeper = build_base_model(tmp_path / "deeper", hidden_size=64, layers=3)
    path = build_adapter(deeper, tmp_path / "x", AdapterShape(r=8), seed=9)
    spec = _spec_with(world, tmp_path, "x", path, allow_base_mismatch=True)
    [problem] = _problems(tmp_path, spec)
    assert "adapter 'x' targets 4 module(s) that the base model does not have" in problem
    assert "(model.layers.2.self_attn.k_proj, model.layers.2.self_attn.o_proj, " in problem

    wider = build_base_model(tmp_path / "wider", hidden_size=128, layers=2)
    path = build_adapter(wider, tmp_path / "z", AdapterShape(r=8), seed=9)
    spec = _spec_with(world, tmp_path, "z", path, allow_base_mismatch=True)
    problems = _problems(tmp_path, spec)
    assert "adapter 'z': model.layers.0.self_attn.k_proj has lora_A [8, 128]" in problems[0]
    assert problems[-1] == "adapter 'z': further modules not checked"


def test_convolution_lora_is_refused(world, tmp_path):
    path = tmp_path / "x"
    shutil.copytree(world.adapters["b"], path)
    save_file(
        {
            "base_model.model.conv.lora_A.weight": torch.zeros(8, 3, 3, 3),
            "base_model.model.conv.lora_B.weight": torch.zeros(16, 8, 1, 1),
        },
        path / "adapter_model.safetensors",
    )
    problems = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert any("conv is a convolution LoRA" in p for p in problems), problems


def test_non_lora_tensors_are_refused(world, tmp_path):
    path = shutil.copytree(world.adapters["b"], tmp_path / "x")
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(256, 64)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    problems = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert any("not LoRA factors (base_model.model.lm_head.weight)" in p for p in problems)


def test_embedding_copy_that_differs_from_the_base_fails_the_merge(world, tmp_path):
    """PEFT saves a copy of a targeted embedding; one that differs would overwrite the base."""
    shape = AdapterShape(r=4, target_modules=("embed_tokens", "q_proj"))
    path = build_adapter(world.base_model, tmp_path / "x", shape, seed=10)
    tensors = load_file(path / "adapter_model.safetensors")
    copy_key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert copy_key in tensors  # PEFT wrote the embedding copy
    other = build_adapter(world.base_model, tmp_path / "y", shape, seed=11)
    spec = _spec_with(world, tmp_path, "x", path)
    spec["adapters"]["y"] = str(other)
    spec["combinations"][0]["adapters"] = ["y", "x"]
    tensors[copy_key] = tensors[copy_key] + 1.0
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    plan = load_plan(write_spec(tmp_path, spec))  # same shape: only the values tell
    [task] = plan.tasks()
    result = _worker(world, plan).merge(task)
    assert result.status == "failed"
    assert "adapter 'x' carries its own model.embed_tokens weights" in result.error
    assert not Path(merge_dir(plan.output, task.merge_id)).exists()


def test_merge_arithmetic_is_float32_on_a_bfloat16_base(world, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base16")
    spec = base_spec(world, tmp_path / "out", base_model=str(tmp_path / "base16"))
    spec["combinations"][0]["methods"] = [{"combination_type": "svd", "svd_rank": 4}]
    plan = load_plan(write_spec(tmp_path, spec))
    [task] = plan.tasks()
    worker = _worker(world, plan)
    assert next(worker.base.model.parameters()).dtype == torch.bfloat16
    result = worker.merge(task)
    assert result.done, result
    assert result.record["compute_dtype"] == "float32"
    assert result.record["output_dtype"] == "float32"  # the inputs' dtype
    expected = reference_merge(
        world.base_model,
        [world.adapters["a"], world.adapters["b"]],
        [0.5, 0.5],
        "svd",
        task.params,
        seed=task.merge_seed,
    )
    actual = load_file(Path(merge_dir(plan.output, task.merge_id), "adapter_model.safetensors"))
    assert {t.dtype for t in actual.values()} == {torch.float32}
    expected = {k.replace(".merged", ""): v for k, v in expected.items()}
    compare_merge(actual, expected, result.record, rel=1e-5, svd_delta_rel=1e-5)


def test_output_dtype_from_the_spec(world, tmp_path):
    spec = base_spec(world, tmp_path / "out", output_dtype="bfloat16")
    plan = load_plan(write_spec(tmp_path, spec))
    [task] = plan.tasks()
    assert task.output_dtype == "bfloat16"
    default = load_plan(write_spec(tmp_path, base_spec(world, tmp_path / "out"), name="d.yaml"))
    assert next(default.tasks()).merge_id != task.merge_id  # the dtype is part of the identity
    spec["output_dtype"] = "float8"
    [problem] = _problems(tmp_path, spec)
    assert problem.startswith("output_dtype:") and "float8" in problem


def test_names_cannot_reach_outside_the_output(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["adapters"][".."] = spec["adapters"].pop("c")
    [problem] = _problems(tmp_path, spec)
    assert "adapter name '..' must contain a letter or digit" in problem
    for bad in ("../escape0000000", "/abs/path", "0123456789abcdeF"):
        with pytest.raises(ValueError):
            merge_dir(str(tmp_path / "out"), bad)


def test_safetensors_header_length_is_bounded(world, tmp_path):
    path = shutil.copytree(world.adapters["b"], tmp_path / "x")
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    [problem] = _problems(tmp_path, _spec_with(world, tmp_path, "x", path))
    assert "not a safetensors file (bad header length)" in problem
