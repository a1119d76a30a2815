"""Device placement without a GPU: every combination type of the registry through the merge core
with its inputs on another device than the CPU, failing on any tensor the engines make on the
CPU and mix in.

The other device is `meta`: tensors there have shapes and a device but no values, every op runs
on them (views included, which fake CUDA tensors cannot do on a CPU-only torch), and an op that
meets a CPU tensor of one or more dimensions raises, as CUDA does. The merge core reads values
back in two places only (`tensors.all_true`, `tensors.count`); they are answered here by shape.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from raymerge.merge import core, seeding, tensors
from raymerge.merge.engines.fast import FastEngine
from raymerge.merge.registry import METHODS
from raymerge.task import MergeTask

MODULES = ("q", "v")


@pytest.fixture
def valueless(monkeypatch):
    """The merge core's two value reads, answered without values (all finite, all kept)."""
    monkeypatch.setattr(tensors, "all_true", lambda mask: True)
    monkeypatch.setattr(tensors, "count", lambda mask: mask.numel())


def _inputs(device: str) -> list[core.AdapterTensors]:
    generator = torch.Generator().manual_seed(0)
    adapters = []
    for i, rank in enumerate((4, 4)):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(MODULES))
        factors = {
            m: (
                torch.randn(rank, 16, generator=generator).to(device),
                torch.randn(24, rank, generator=generator).to(device),
            )
            for m in MODULES
        }
        adapters.append(core.AdapterTensors(f"in{i}", config, factors))
    return adapters


def _recipe(name: str) -> MergeTask:
    method = METHODS[name]
    params = dict(method.defaults())
    if "density" in method.required() or "density" in params:
        params["density"] = 0.5
    if "svd_rank" in method.required() or "svd_rank" in params:
        params["svd_rank"] = 4
    return MergeTask("0123456789abcdef", ("in0", "in1"), (0.6, 0.4), name, params, 0, 1, "float32")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_type_merges_where_its_inputs_are(valueless, name):
    merged = core.merge(_recipe(name), _inputs("meta"), FastEngine(list(MODULES)))
    assert merged.ran.device == "meta"
    assert {t.device.type for t in merged.tensors.values()} == {"meta"}
    assert len(merged.tensors) == 2 * len(MODULES)


def test_the_valueless_run_has_the_shapes_of_a_real_one():
    """The same recipes on the CPU (real values, real value reads) give the same keys and
    shapes: the meta runs above merge what a real device would."""
    for name in ("cat", "core_ties", "iso_c", "knots_dare_ties", "dare_ties_svd"):
        recipe = _recipe(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tensors, "all_true", lambda mask: True)
            patch.setattr(tensors, "count", lambda mask: mask.numel())
            fake = core.merge(recipe, _inputs("meta"), FastEngine(list(MODULES)))
        real = core.merge(recipe, _inputs("cpu"), FastEngine(list(MODULES)))
        assert real.ran.device == "cpu"
        shapes = {k: t.shape for k, t in real.tensors.items()}
        assert {k: t.shape for k, t in fake.tensors.items()} == shapes


def test_masks_are_placed_on_the_device_of_what_they_mask():
    with seeding.seeded(0):
        masks = seeding.bernoulli_masks([torch.empty(3, 4, device="meta")], 0.5)
    assert masks[0].device.type == "meta" and masks[0].shape == (3, 4)
