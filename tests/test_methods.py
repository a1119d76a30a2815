"""The method registry drives everything: every entry's parameters, rank rule and arithmetic are
checked here, so a new entry is covered without a new test (and an incomplete one fails)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils import merge_utils
from transformers import AutoModelForCausalLM

from raymerge.merge import arithmetic
from raymerge.merge.engines.fast import merge_tensors
from raymerge.merge.format import PREFIX
from raymerge.merge.registry import METHODS, PARAMS, REQUIRED, Form, RankRule
from raymerge.merge.tensors import AdapterTensors
from raymerge.sweep.spec import MethodSpec

ALL = list(METHODS)


def _adapters(ranks: list[int], modules=("m.q", "m.k"), features=(24, 16)) -> list:
    torch.manual_seed(sum(ranks))
    adapters = []
    for i, rank in enumerate(ranks):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q", "k"])
        factors = {
            m: (torch.randn(rank, features[0]), torch.randn(features[1], rank)) for m in modules
        }
        adapters.append(AdapterTensors(f"in{i}", config, factors))
    return adapters


def _params(method, **given) -> dict:
    params = method.defaults()
    params.update({k: v for k, v in given.items() if method.takes(k)})
    return params


@pytest.mark.parametrize("name", ALL)
def test_every_entry_is_complete(name):
    method = METHODS[name]
    assert method.doc and method.name == name
    assert set(method.params) <= set(PARAMS), "a parameter the spec does not know"
    assert set(method.defaults()) == set(method.params)
    if method.form in (Form.FACTORWISE, Form.DELTA_SVD):
        assert callable(method.combine)
    if method.random:
        assert "density" in method.required()


@pytest.mark.parametrize("name", ALL)
def test_rank_invariants(name):
    """cat: the sum of the ranks; the svd types: svd_rank, else the largest; the rest: the one
    shared rank. The written factors have that rank."""
    method = METHODS[name]
    ranks = [8, 8] if method.rank is RankRule.EQUAL else [8, 4]
    for svd_rank in (None, 6):
        params = _params(method, density=0.5, svd_rank=svd_rank)
        state, config = merge_tensors(_adapters(ranks), [0.7, -0.4], method, params, 0, ["m.q"])
        expected = {
            RankRule.SUM: sum(ranks),
            RankRule.SVD: svd_rank or max(ranks),
            RankRule.EQUAL: ranks[0],
        }[method.rank]
        assert config.r == config.lora_alpha == expected
        assert state[f"{PREFIX}m.q.lora_A.weight"].shape[0] == expected
        assert state[f"{PREFIX}m.q.lora_B.weight"].shape[1] == expected


@pytest.mark.parametrize("name", [n for n in ALL if METHODS[n].peft])
def test_rank_rule_is_peft_own(world, name):
    """The registry's rank rule against PEFT's own sizing of a merged adapter."""
    method = METHODS[name]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world.base_model), world.adapters["a"], "a"
    )
    other = "b" if method.rank is RankRule.EQUAL else "d"  # d has rank 4
    model.load_adapter(world.adapters[other], adapter_name=other)
    for svd_rank in (None, 3):
        _, new_rank, _ = model._check_add_weighted_adapter(["a", other], name, svd_rank)
        params = _params(method, svd_rank=svd_rank)
        assert method.merged_rank([8, 8 if other == "b" else 4], params) == new_rank


def test_the_spec_offers_exactly_the_registry_parameters():
    fields = set(MethodSpec.model_fields) - {"combination_type"}
    assert fields == set(PARAMS)
    for name, param in PARAMS.items():
        bad = {"density": 0.0, "svd_clamp": 1.5, "svd_rank": 0, "svd_driver": "lapack"}.get(name)
        if bad is not None:
            assert param.check(bad), f"{name} accepts {bad!r}"
    assert all(v is not REQUIRED for m in METHODS.values() for v in m.defaults().values())


@pytest.mark.parametrize("density", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("combine", ["task_arithmetic", "ties", "magnitude_prune"])
def test_batched_arithmetic_equals_peft_module_by_module(combine, density):
    """Many modules at once give exactly PEFT's per-module results (pruning per module)."""
    torch.manual_seed(1)
    stacked = torch.randn(3, 5, 8, 12)  # 3 inputs, 5 modules
    weights = torch.tensor([0.5, -1.25, 0.75])
    params = {"density": density, "majority_sign_method": "total"}
    prunes = density >= 1 and combine != "task_arithmetic"
    with pytest.warns(UserWarning, match="no pruning") if prunes else contextlib.nullcontext():
        batched = getattr(arithmetic, combine)(stacked, weights, params)
    for m in range(stacked.shape[1]):
        tensors = [stacked[i, m] for i in range(stacked.shape[0])]
        kwargs = {} if combine == "task_arithmetic" else {"density": density}
        if combine == "ties":
            kwargs["majority_sign_method"] = "total"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's own "no pruning" notice
            expected = getattr(merge_utils, combine)(tensors, weights, **kwargs)
        assert torch.equal(batched[m], expected), (combine, m)


def test_batched_dare_equals_peft_with_the_same_masks():
    torch.manual_seed(2)
    stacked = torch.randn(2, 4, 6, 10)
    weights = torch.tensor([1.0, 0.5])
    torch.manual_seed(7)
    masks = torch.stack(
        [
            torch.stack([torch.bernoulli(torch.full_like(stacked[i, m], 0.6)) for m in range(4)])
            for i in range(2)
        ]
    )
    batched = arithmetic.dare_ties(stacked, weights, {"density": 0.6}, masks)
    for m in range(4):
        pruned = torch.stack([stacked[i, m] * masks[i, m] / 0.6 for i in range(2)])
        agree = merge_utils.calculate_majority_sign_mask(pruned, "total")
        weighted = pruned * weights.view(-1, 1, 1)
        assert torch.equal(batched[m], merge_utils.disjoint_merge(weighted, agree))
