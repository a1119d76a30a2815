"""One dtype for scoring on a bfloat16 base: every eval slot holds its merge in the dtype its
files are written in, every reference adapter its own file's tensors, and K merges per pass score
exactly as one at a time (in-process workers, real PEFT)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from helpers import base_spec, write_spec
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from raymerge.cluster.worker import MergeWorker
from raymerge.score.slots import load_reference
from raymerge.sweep.plan import load_plan

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def bf16(world, tmp_path_factory):
    """The world's base model saved in bfloat16 (with its tokenizer), a text eval set, and
    adapter `a` saved again in bfloat16 as `a16`."""
    root = tmp_path_factory.mktemp("bf16")
    base = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.bfloat16)
    base.save_pretrained(root / "base16")
    AutoTokenizer.from_pretrained(world.base_model).save_pretrained(root / "base16")
    rng = random.Random(0)
    with open(root / "text.jsonl", "w") as out:
        for _ in range(24):
            text = "".join(rng.choice("abcdefgh 0123456789") for _ in range(rng.randint(8, 40)))
            out.write(json.dumps({"text": text}) + "\n")
    a16 = shutil.copytree(world.adapters["a"], root / "a16")
    tensors = load_file(a16 / WEIGHTS)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, a16 / WEIGHTS)
    return root


def _plan(world, bf16, tmp_path, per_pass: int, **overrides):
    spec = base_spec(world, tmp_path / f"out{per_pass}", base_model=str(bf16 / "base16"))
    spec["adapters"]["a16"] = str(bf16 / "a16")
    spec["combinations"] = [
        {
            "adapters": group,
            "weights": [[0.5, 0.5], [0.9, 0.1]],
            "methods": [{"combination_type": ["linear", "cat"]}],
        }
        for group in (["a", "b"], ["b", "c"])
    ]
    spec["evaluate"] = {
        "datasets": {"text": str(bf16 / "text.jsonl")},
        "batch_size": 4,
        "max_length": 32,
        "adapters_per_pass": per_pass,
    }
    spec.update(overrides)
    return load_plan(write_spec(tmp_path, spec, f"k{per_pass}.yaml"))


def _slot_dtypes(worker: MergeWorker) -> set[torch.dtype]:
    return {p.dtype for n, p in worker.base.peft.named_parameters() if ".slot_" in n}


@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_k_merges_per_pass_score_exactly_as_one_at_a_time_on_a_bfloat16_base(
    world, bf16, tmp_path, output_dtype
):
    """8 merges written in `output_dtype`, scored 1 and 4 per pass, and the references (the
    base, float32 adapters, a bfloat16 one) 1 and 4 per pass: the same losses, to the last
    digit. (Before, the slots were float32 whatever the merge's files held, and one adapter went
    through PEFT's plain forward, several through its mixed batch, which rounds differently on a
    bfloat16 base: up to 1.4e-4 apart.)"""
    scores = {}
    for per_pass in (1, 4):
        plan = _plan(world, bf16, tmp_path, per_pass, output_dtype=output_dtype)
        worker = MergeWorker(0, plan.worker_config())
        assert next(worker.base.model.parameters()).dtype == torch.bfloat16
        tasks = list(plan.tasks())
        results = worker.merge_many(tasks, [0] * len(tasks))
        assert all(r.done for r in results), [r.error for r in results]
        assert {r.record["output_dtype"] for r in results} == {output_dtype}
        assert _slot_dtypes(worker) == {getattr(torch, output_dtype)}
        references = worker.score_references(["a", "b", "a16"])
        scores[per_pass] = ([r.record["metrics"] for r in results], references)
    one, together = scores[1], scores[4]
    assert len(one[0]) == 8 and len({m["text"]["loss"] for m in one[0]}) == 8  # distinct merges
    assert one == together


def test_a_reference_holds_its_files_tensors_in_their_dtype(world, bf16, tmp_path):
    """float32 and bfloat16 adapter files loaded as references on a bfloat16 base: each factor
    is its file's tensor, bit for bit, in the file's dtype (PEFT would upcast the bfloat16 one)."""
    worker = MergeWorker(0, _plan(world, bf16, tmp_path, 1).worker_config())
    folders = {"ref_a": world.adapters["a"], "ref_a16": bf16 / "a16", "ref_b": world.adapters["b"]}
    for name, folder in folders.items():
        load_reference(worker.base, folder, name)
    params = dict(worker.base.peft.named_parameters())
    for name, folder in folders.items():
        saved = load_file(folder / WEIGHTS)
        assert saved, folder
        for key, tensor in saved.items():
            module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            param = params[f"base_model.model.{module}.lora_{part.replace('.', f'.{name}.', 1)}"]
            assert param.dtype == tensor.dtype and torch.equal(param.detach(), tensor), key
