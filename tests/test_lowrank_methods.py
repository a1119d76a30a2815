"""The merging methods PEFT does not have, each against a dense reference written here from its
paper's definition (form every delta, apply the method as stated, truncate by dense SVD), on
generated adapters of mixed ranks and on real gpt2 adapters; and written as PEFT LoRAs that
reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import lora_deltas, methods_for, relative_error, reload_merged, write_spec
from peft import LoraConfig
from safetensors.torch import load_file

from raymerge.cluster.driver import run_sweep
from raymerge.merge.engines.fast import merge_tensors
from raymerge.merge.engines.reference import dense_reference
from raymerge.merge.format import PREFIX
from raymerge.merge.registry import METHODS
from raymerge.merge.tensors import AdapterTensors
from raymerge.sweep.plan import load_plan

NEW = [m.name for m in METHODS.values() if not m.peft]
REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real_adapters"


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _adapters(ranks, shapes, seed=0):
    """Generated adapters of the given ranks on modules of the given (out, in) shapes."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, rank in enumerate(ranks):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["m"])
        factors = {
            f"m{j}": (torch.randn(rank, n, generator=generator) / n**0.5,
                      torch.randn(m, rank, generator=generator))
            for j, (m, n) in enumerate(shapes)
        }  # fmt: skip
        out.append(AdapterTensors(f"in{i}", config, factors))
    return out


PARAMS = {"density": 0.4, "alpha": 0.7, "k": 0.75, "svd_rank": 6}


def _check(name: str, adapters, weights, modules, rel: float = 1e-5) -> None:
    method = METHODS[name]
    params = {**method.defaults(), **{k: v for k, v in PARAMS.items() if method.takes(k)}}
    seed = 1234
    state, config = merge_tensors(adapters, weights, method, params, seed, modules)
    assert config.r == params["svd_rank"]
    torch.manual_seed(seed)  # the engine's draws, in its order: module by module, input by input
    for module in modules:
        factors = [
            (a.factors[module][1], a.factors[module][0], w * a.scaling(module))
            for a, w in zip(adapters, weights, strict=True)
        ]
        rank = params["svd_rank"]
        expected = _best_rank(dense_reference(name, factors, params, rank), rank)
        lora_a = state[f"{PREFIX}{module}.lora_A.weight"].double()
        lora_b = state[f"{PREFIX}{module}.lora_B.weight"].double()
        assert lora_a.shape[0] == lora_b.shape[1] == params["svd_rank"]
        assert relative_error(lora_b @ lora_a, expected) <= rel, (name, module)


@pytest.mark.parametrize("name", NEW)
def test_each_new_method_equals_its_dense_definition_on_mixed_ranks(name):
    adapters = _adapters([8, 4, 6], [(48, 40), (32, 56)])
    _check(name, adapters, [0.6, -0.8, 1.1], ["m0", "m1"])


def test_every_method_peft_lacks_has_a_reference_here():
    assert set(NEW) == {"core_ta", "core_ties", "core_dare", "knots_ties", "knots_dare", "tsv",
                        "iso_c"}  # fmt: skip


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the real adapters are not here ({REAL})")
@pytest.mark.parametrize("name", NEW)
def test_each_new_method_equals_its_definition_on_real_gpt2_adapters(name):
    """tigrinya (r=8) and ironhack_r4 (r=4) on one attention layer's c_attn and c_proj."""
    from safetensors.torch import load_file as load

    modules = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    adapters = []
    for folder in ("tigrinya", "ironhack_r4"):
        tensors = load(REAL / folder / "adapter_model.safetensors")
        config = json.loads((REAL / folder / "adapter_config.json").read_text())
        factors = {
            m: (tensors[f"base_model.model.{m}.lora_A.weight"].float(),
                tensors[f"base_model.model.{m}.lora_B.weight"].float())
            for m in modules
        }  # fmt: skip
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=["c_attn"])
        adapters.append(AdapterTensors(folder, lora, factors))
    _check(name, adapters, [0.7, 0.5], modules)


def test_core_ta_is_the_exact_weighted_sum():
    adapters = _adapters([8, 4], [(40, 40)])
    method = METHODS["core_ta"]
    params = {**method.defaults(), "svd_rank": 12}
    state, _ = merge_tensors(adapters, [0.5, -1.5], method, params, 0, ["m0"])
    delta = state[f"{PREFIX}m0.lora_B.weight"] @ state[f"{PREFIX}m0.lora_A.weight"]
    exact = sum(w * a.scaling("m0") * a.factors["m0"][1] @ a.factors["m0"][0]
                for a, w in zip(adapters, [0.5, -1.5], strict=True))  # fmt: skip
    assert relative_error(delta, exact) <= 1e-5


def test_new_methods_are_written_as_peft_loras_that_reload(world, ray_cluster, tmp_path):
    """Every new type through a real sweep (adapters of ranks 8 and 4, both engines' setting):
    PeftModel.from_pretrained loads each, its deltas are the file's, and its rank is svd_rank;
    the random ones give the same bytes run after run."""
    spec = {
        "base_model": str(world.base_model),
        "adapters": {n: str(p) for n, p in world.adapters.items()},
        "combinations": [
            {
                "adapters": ["a", "d"],
                "weights": [[0.7, -0.4]],
                "methods": methods_for(NEW, density=0.5, svd_rank=6, alpha=0.9, k=0.5),
            }
        ],
        "output": str(tmp_path / "one"),
        "workers": 1,
        "gpus_per_worker": 0,
        "engine": "peft",  # not PEFT's types: the fast engine runs them, and says so
    }
    plans = []
    for name in ("one", "two"):
        spec["output"] = str(tmp_path / name)
        plan = load_plan(write_spec(tmp_path, spec, f"{name}.yaml"))
        summary = run_sweep(plan)
        assert (summary.done, summary.failed) == (len(NEW), 0), summary.failures
        plans.append(plan)
    for task in plans[0].tasks():
        folder = Path(plans[0].output, "merges", task.merge_id)
        record = json.loads((folder / "merge.json").read_text())
        assert record["engine"] == "fast" and "not one of PEFT's" in record["engine_fallback"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == 6
        written = load_file(folder / "adapter_model.safetensors")
        reloaded = lora_deltas(reload_merged(world.base_model, folder), "merged")
        assert len(reloaded) == 8
        for key, delta in reloaded.items():
            b = written[f"{key}.lora_B.weight"]
            a = written[f"{key}.lora_A.weight"]
            assert relative_error(delta, b @ a) <= 1e-6, (task.combination_type, key)
        other = Path(plans[1].output, "merges", task.merge_id, "adapter_model.safetensors")
        assert other.read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
