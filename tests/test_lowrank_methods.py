"""The merging methods PEFT does not have, each against a dense reference written here from its
paper's definition (form every delta, apply the method as stated, truncate by dense SVD), on
generated adapters of mixed ranks and on real gpt2 adapters; and written as PEFT LoRAs that
reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    adapter_tensors,
    check_dense,
    lora_deltas,
    methods_for,
    relative_error,
    reload_merged,
    write_spec,
)
from peft import LoraConfig
from safetensors.torch import load_file

from raymerge.cluster.driver import run_sweep
from raymerge.merge.engines import lowrank
from raymerge.merge.engines.fast import merge_tensors
from raymerge.merge.engines.lowrank import tsv_budget
from raymerge.merge.format import PREFIX
from raymerge.merge.registry import METHODS
from raymerge.merge.tensors import AdapterTensors
from raymerge.sweep.plan import load_plan

NEW = [m.name for m in METHODS.values() if not m.peft]
REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real_adapters"


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


@pytest.mark.parametrize("name", NEW)
def test_each_new_method_equals_its_dense_definition_on_mixed_ranks(name):
    adapters = _adapters([8, 4, 6], [(48, 40), (32, 56)])
    check_dense(name, adapters, [0.6, -0.8, 1.1], ["m0", "m1"])


@pytest.mark.parametrize("name", ["core_ta", "core_ties", "tsv"])
def test_batched_methods_merge_modules_of_equal_shapes_in_one_call(name, monkeypatch):
    """Four modules of one shape go through one batched call (one module of another shape
    through its own), and every module still equals its dense definition."""
    calls: list[tuple[int, ...]] = []
    merging = lowrank.merge_factors

    def counted(method, inputs, params, rank):
        calls.append(tuple(inputs[0][0].shape))  # the first input's B: [M, out, r]
        return merging(method, inputs, params, rank)

    monkeypatch.setattr(lowrank, "merge_factors", counted)
    adapters = _adapters([8, 4, 6], [(48, 40)] * 4 + [(32, 56)])
    check_dense(name, adapters, [0.6, -0.8, 1.1], [f"m{j}" for j in range(5)])
    assert sorted(calls) == [(1, 32, 8), (4, 48, 8)]


def test_every_method_peft_lacks_has_a_reference_here():
    assert set(NEW) == {"core_ta", "core_ties", "core_dare", "knots_ties", "knots_dare_ties",
                        "knots_dare_linear", "tsv", "iso_c"}  # fmt: skip


MIXED = ([8, 4, 6], [(48, 40), (32, 56)])
"""The mixed-rank world of the first test: three adapters (R = 18) on two modules."""


def test_knots_dare_ties_is_the_papers_dare_ties_not_the_plain_sum():
    """KnOTS' code (gstoica27/KnOTS, its *_knots_dare_ties configs): DARE on the blocks, then
    TIES' sign election and disjoint mean. The same masks (one seed) as knots_dare_linear, so
    the two differ by the election alone, and clearly."""
    adapters = _adapters(*MIXED)
    weights, modules = [0.6, -0.8, 1.1], ["m0", "m1"]
    ties = check_dense("knots_dare_ties", adapters, weights, modules)
    linear = check_dense("knots_dare_linear", adapters, weights, modules)
    assert relative_error(ties, linear) >= 0.3


def test_tsv_with_the_papers_budget_equals_its_dense_definition():
    """k_of: dims keeps TSV-Merge's int(min(out, in) / T) triplets per task, not past the
    task's rank: on 12 x 10 that is 3 of every task (ranks 8, 4, 6); on 20 x 16, 5, 4 and 5."""
    adapters = _adapters([8, 4, 6], [(12, 10), (20, 16)])
    weights, modules = [0.6, -0.8, 1.1], ["m0", "m1"]
    paper = check_dense("tsv", adapters, weights, modules, k=1.0, k_of="dims")
    check_dense("tsv", adapters, weights, modules, k_of="dims")  # k = 0.75 of that budget
    own = check_dense("tsv", adapters, weights, modules, k=1.0, k_of="rank")  # all 18 triplets
    assert relative_error(paper, own) >= 0.1


def test_tsv_budget_is_the_rank_or_the_papers_share():
    assert tsv_budget("rank", 8, (12, 10), 3) == 8
    assert tsv_budget("dims", 8, (12, 10), 3) == 3  # int(10 / 3)
    assert tsv_budget("dims", 4, (20, 16), 3) == 4  # 5 > the rank: the rank
    assert tsv_budget("dims", 4, (4096, 4096), 8) == 4  # real LoRAs: the rank, as k_of: rank
    assert tsv_budget("dims", 4, (2, 2), 3) == 1  # int(2 / 3) = 0: at least one


def test_iso_c_over_the_whole_spectrum_equals_its_dense_definition():
    """mean_over: all is Iso-C's code (danielm1405/iso-merging: S.mean() over all min(out, in)
    values); on a sum of rank R = 18 its flat value is 18 / min(out, in) of the default's."""
    adapters = _adapters(*MIXED)
    weights, modules = [0.6, -0.8, 1.1], ["m0", "m1"]
    whole = check_dense("iso_c", adapters, weights, modules, mean_over="all")
    nonzero = check_dense("iso_c", adapters, weights, modules, mean_over="nonzero")
    assert relative_error(whole, nonzero * 18 / 40) <= 1e-5  # m0 is 48 x 40
    assert relative_error(whole, nonzero) >= 0.5


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the real adapters are not here ({REAL})")
@pytest.mark.parametrize("name", NEW)
def test_each_new_method_equals_its_definition_on_real_gpt2_adapters(name):
    """tigrinya (r=8) and ironhack_r4 (r=4) on one attention layer's c_attn and c_proj."""

    modules = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    adapters = [adapter_tensors(REAL / folder, modules) for folder in ("tigrinya", "ironhack_r4")]
    check_dense(name, adapters, [0.7, 0.5], modules)


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


def test_the_old_knots_dare_name_is_refused_saying_what_it_became():
    """One name never means two merges: a spec with the old name says which two replaced it."""
    from raymerge.errors import SpecError
    from raymerge.sweep.spec import parse_spec

    spec = {"base_model": "b", "adapters": {"x": "x", "y": "y"}, "output": "o"}
    group = {"adapters": ["x", "y"], "weights": [[1, 1]]}
    group["methods"] = [{"combination_type": "knots_dare", "density": 0.5}]
    with pytest.raises(SpecError) as caught:
        parse_spec({**spec, "combinations": [group]})
    assert "knots_dare_ties" in str(caught.value) and "knots_dare_linear" in str(caught.value)
