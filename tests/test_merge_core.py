"""The merge core: one seeding policy for both engines (mask for mask), and merge.json's compute
dtype is what ran, not a literal."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import base_spec, write_spec
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from raymerge.cluster.merger import Merger
from raymerge.cluster.worker import MergeWorker
from raymerge.merge import core, seeding
from raymerge.merge.engines import fast
from raymerge.sweep.plan import load_plan

aten = torch.ops.aten
PRODUCTS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.mv, aten.dot, aten._linalg_svd}
PRODUCTS |= {aten.linalg_qr, aten.linalg_eigh, aten.sum, aten.mean}
"""Matrix products, factorisations and reductions: arithmetic, whatever their operands."""
ELEMENTWISE = {aten.add, aten.sub, aten.mul, aten.div}
"""Arithmetic where two tensors meet. With one tensor and a number (`b * scale` to check it is
finite, `+ 0.0` to turn -0.0 into 0.0) they only touch values already computed."""

DARE_TYPES = {
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    # PEFT's dense path: masks over whole deltas, in the layer's own weight layout
    "dare_linear_svd": {"density": 0.5, "svd_rank": 4},
}


def _plan(world, tmp_path, combination_type: str, params: dict, **overrides):
    spec = base_spec(world, tmp_path / "out", gpus_per_worker=0, **overrides)
    spec["combinations"][0]["methods"] = [{"combination_type": combination_type, **params}]
    return load_plan(write_spec(tmp_path, spec))


def _recorded_masks(monkeypatch) -> list[torch.Tensor]:
    """Every Bernoulli draw of the seeding policy, in order, whichever engine asks for it (the
    fast engine draws module by module, PEFT's path mask by mask)."""
    drawn: list[torch.Tensor] = []
    policy = seeding.draw_masks

    def recording(count, density):
        masks = policy(count, density)
        drawn.append(masks.clone())
        return masks

    monkeypatch.setattr(seeding, "draw_masks", recording)
    return drawn


@pytest.mark.parametrize("combination_type", sorted(DARE_TYPES))
def test_both_engines_draw_the_same_masks(world, tmp_path, monkeypatch, combination_type):
    plan = _plan(world, tmp_path, combination_type, DARE_TYPES[combination_type])
    [task] = plan.tasks()
    merger = Merger(plan.worker_config())
    inputs = merger.inputs(task.adapters)
    drawn = _recorded_masks(monkeypatch)
    fast = core.merge(task, inputs, merger.fast)
    fast_masks = torch.cat(drawn) if drawn else torch.empty(0)
    drawn.clear()
    peft = core.merge(task, inputs, merger.peft_engine())
    assert (fast.ran.engine, peft.ran.engine) == ("fast", "peft")
    # PEFT, left to itself, draws its masks without the policy: none would be recorded.
    assert len(drawn) > 0
    peft_masks = torch.cat(drawn)
    assert fast_masks.shape == peft_masks.shape and torch.equal(fast_masks, peft_masks)
    assert 0.4 < float(fast_masks.mean()) < 0.6  # real draws at density 0.5
    assert fast.tensors.keys() == peft.tensors.keys()
    for key, tensor in fast.tensors.items():
        torch.testing.assert_close(tensor, peft.tensors[key], rtol=1e-5, atol=1e-6)


def test_masks_do_not_depend_on_the_device_of_what_they_mask():
    """The policy draws on the CPU stream and only then places a mask: tensors on another
    device (here `meta`) consume the stream exactly as CPU tensors do, so a model sharded over
    GPUs gets the masks a CPU worker gets."""
    shapes = [(4, 8), (8, 4), (3, 5)]
    states = {}
    for device in ("cpu", "meta"):
        with seeding.seeded(123):
            masks = seeding.bernoulli_masks([torch.empty(s, device=device) for s in shapes], 0.3)
            states[device] = torch.get_rng_state()
            after = torch.rand(3)
        assert {m.device.type for m in masks} == {device}
        states[device + "_next"] = after
    assert torch.equal(states["cpu"], states["meta"])
    assert torch.equal(states["cpu_next"], states["meta_next"])


def test_seeded_leaves_the_callers_stream_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    with seeding.seeded(99):
        seeding.bernoulli_masks([torch.empty(10)], 0.5)
    assert torch.equal(torch.rand(4), expected)


class ArithmeticDtypes(TorchDispatchMode):
    """Counts the floating-point dtypes the arithmetic ops (`PRODUCTS`, `ELEMENTWISE`) compute
    in: what ran, whatever any code says it ran."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if packet is aten.sum and out.dim() == 0:
            return out  # a sum to one number: the output's finiteness check, no factor
        if packet in PRODUCTS or (packet in ELEMENTWISE and sum(t.dim() > 0 for t in operands) > 1):
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    self.counts[str(tensor.dtype).removeprefix("torch.")] += 1
        return out


def _measured_arithmetic(monkeypatch) -> Counter:
    """The dtypes of the fast engine's arithmetic, counted op by op while it computes the merged
    factors (`merge_into`; the cast into the output and its finiteness checks are copies and
    comparisons, not counted as arithmetic)."""
    counts: Counter = Counter()
    computing = fast.merge_into

    def measured(*args, **kwargs):
        with ArithmeticDtypes(counts):
            return computing(*args, **kwargs)

    monkeypatch.setattr(fast, "merge_into", measured)
    return counts


@pytest.mark.parametrize(
    ("combination_type", "params", "expected"),
    [
        ("linear", {}, "float32"),
        ("svd", {"svd_rank": 4}, "float32"),  # its factors' QR and SVD, in the factors' dtype
        ("core_ta", {"svd_rank": 4}, "float64"),  # the methods PEFT lacks work in float64
        ("knots_ties", {"density": 0.5, "svd_rank": 4}, "float64"),
    ],
)
def test_merge_json_records_the_compute_dtype_that_ran(
    world, tmp_path, monkeypatch, combination_type, params, expected
):
    plan = _plan(world, tmp_path, combination_type, params)
    [task] = plan.tasks()
    measured = _measured_arithmetic(monkeypatch)
    result = MergeWorker(0, plan.worker_config()).merge(task)
    assert result.done, result
    assert result.record["engine"] == "fast"
    assert sum(measured.values()) > 0  # the arithmetic was seen
    assert set(measured) == {result.record["compute_dtype"]}, measured
    assert result.record["compute_dtype"] == expected
    assert result.record["worker"]["device"] == "cpu"


def test_peft_path_on_a_bfloat16_base_records_bfloat16(world, tmp_path):
    """PEFT computes a merge into factors of the base layer's dtype: on a bf16 base its `cat`
    is rounded to bf16 before the output cast, and merge.json says so."""
    base = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base16")
    plan = _plan(world, tmp_path, "cat", {}, base_model=str(tmp_path / "base16"), engine="peft")
    [task] = plan.tasks()
    result = MergeWorker(0, plan.worker_config()).merge(task)
    assert result.done, result
    assert result.record["engine"] == "peft"
    assert result.record["compute_dtype"] == "bfloat16"
    assert result.record["output_dtype"] == "float32"


RANK_READS = {"knots_ties", "knots_dare_ties", "knots_dare_linear", "iso_c"}
"""Types that read each module's numerical rank (how many singular values are not zero), which
sets the shapes of what follows: one read per module, by their definition."""


class ValueReads(TorchDispatchMode):
    """Counts every read of a tensor's value into Python (`bool`, `int`, `float`, `.item()`: the
    `_local_scalar_dense` op), through any seam or none: each is a host synchronisation on a
    GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is aten._local_scalar_dense:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "method",
    [
        {"combination_type": "linear"},
        {"combination_type": "cat"},
        {"combination_type": "ties", "density": 0.5},
        {"combination_type": "dare_linear", "density": 0.5},
        {"combination_type": "dare_ties", "density": 0.5},
        {"combination_type": "magnitude_prune", "density": 0.5},
        {"combination_type": "svd"},
        {"combination_type": "ties_svd", "density": 0.5},
        {"combination_type": "core_ties", "density": 0.5},
        {"combination_type": "knots_dare_ties", "density": 0.5},
        {"combination_type": "tsv"},
        {"combination_type": "iso_c"},
    ],
    ids=lambda method: method["combination_type"],
)
@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_a_merge_reads_one_value_back_not_one_per_tensor(
    world, tmp_path, monkeypatch, method, output_dtype
):
    """The value reads a GPU would synchronise on: one per merge, the finiteness of its output
    and of the SVD types' inputs at once (the world's merges hold 16 to 24 tensors), counted
    at the seams (`tensors.all_true`, `tensors.count`) and op by op (any read at all)."""
    from raymerge.merge import tensors

    combination = {"adapters": ["a", "b"], "weights": [[0.5, 0.5]], "methods": [method]}
    spec = base_spec(world, tmp_path / "out", combinations=[combination],
                     output_dtype=output_dtype)  # fmt: skip
    plan = load_plan(write_spec(tmp_path, spec))
    worker = MergeWorker(0, plan.worker_config())
    [task] = plan.tasks()
    inputs = worker.merger.inputs(task.adapters)
    reads = Counter()
    for seam in ("all_true", "count"):
        original = getattr(tensors, seam)

        def counted(mask, seam=seam, original=original):
            reads[seam] += 1
            return original(mask)

        monkeypatch.setattr(tensors, seam, counted)
    with ValueReads() as every_read:
        merged = worker.merger.merge(task, inputs)
    worker.close()
    assert merged.ran.engine == "fast"
    assert len(merged.tensors) >= 16
    modules = len(merged.tensors) // 2
    expected = 1 + modules if method["combination_type"] in RANK_READS else 1
    assert reads["all_true"] == 1, reads
    assert sum(reads.values()) == every_read.count == expected, (reads, every_read.count)


@pytest.mark.parametrize(
    ("combination_type", "params"),
    [
        ("linear", {}),
        ("cat", {}),
        ("ties", {"density": 0.5}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.5}),
        ("magnitude_prune", {"density": 0.5}),
        ("svd", {}),
        ("core_ties", {"density": 0.5}),
        ("tsv", {}),
    ],
)
def test_whole_groups_as_a_gpu_takes_them_give_the_same_merge(
    world, tmp_path, monkeypatch, combination_type, params
):
    """A GPU merges each kind of module in one piece (DARE's masks drawn at once, each chunk's
    taken as views of that draw); the CPU in cache-sized chunks (here one module each, masks
    drawn as each module is merged). Forced onto the CPU, the GPU's way writes the same file."""
    from raymerge.merge.engines import chunks as chunking

    plan = _plan(world, tmp_path, combination_type, params)
    [task] = plan.tasks()
    merger = Merger(plan.worker_config())
    inputs = merger.inputs(task.adapters)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1)
    pieces = core.merge(task, inputs, merger.fast)
    monkeypatch.setattr(chunking, "whole_groups", lambda device: True)
    whole = core.merge(task, inputs, merger.fast)
    assert pieces.file is not None and whole.file is not None
    assert torch.equal(pieces.file.data, whole.file.data)


@pytest.mark.parametrize("density", [0.5, 0.3, 0.123456789, 0.9, 0.01])
def test_masks_drawn_as_uniforms_are_bernoullis_own(density):
    """PEFT draws `bernoulli(full_like(x, density))` tensor by tensor; the policy draws the
    stream's uniforms and compares them with the density, in one call: the same masks, for
    tensors of any shapes one after the other, and the same stream after them."""
    shapes = [(3, 1000), (7,), (64, 33), (1,)]
    for seed in (0, 7, 2**31 + 5):
        with seeding.seeded(seed):
            expected = torch.cat(
                [torch.bernoulli(torch.full(s, density)).flatten() for s in shapes]
            )
            after_expected = torch.rand(3)
        with seeding.seeded(seed):
            drawn = seeding.draw_masks(sum(math.prod(s) for s in shapes), density)
            after = torch.rand(3)
        assert drawn.dtype == expected.dtype == torch.float32
        assert torch.equal(drawn, expected) and torch.equal(after, after_expected)


@pytest.mark.parametrize("init", [True, False])
def test_the_replay_of_peft_initialisation_leaves_the_stream_where_peft_does(init):
    """PEFT makes two nn.Linear layers per target module, then (init True) runs its own init of
    A: drawn tensor by tensor. The replay draws the same count of uniforms in blocks."""
    shapes = [(64, 64), (64, 192), (576, 1536)] * 7
    with seeding.seeded(11):
        for in_features, out_features in shapes:
            torch.nn.init.kaiming_uniform_(torch.empty(8, in_features), a=5**0.5)
            torch.nn.init.kaiming_uniform_(torch.empty(out_features, 8), a=5**0.5)
            if init:
                torch.nn.init.kaiming_uniform_(torch.empty(8, in_features), a=5**0.5)
        expected = torch.rand(5)
    with seeding.seeded(11):
        seeding.replay_peft_initialisation(shapes, init, 8)
        replayed = torch.rand(5)
    assert torch.equal(replayed, expected)
