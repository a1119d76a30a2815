"""Device placement without a GPU: every combination type of the registry through the merge core
with its inputs on another device than the CPU, failing on any tensor the engines make on the
CPU and mix in.

The other device is `meta`: tensors there have shapes and a device but no values, and every op
runs on them (views included, which fake CUDA tensors cannot do on a CPU-only torch). But torch
does not check devices for meta the way CUDA does: element-wise ops refuse a CPU operand, while
`mm`, `matmul`, `bmm` and `einsum` take one silently (`bmm` and `einsum` even answer on the CPU),
and the low-rank engines are mostly matrix products. So the merges run under `SameDevice`, a
dispatch mode that checks the devices of every op (the last test shows it catching, in each
engine path that multiplies matrices, what torch lets through). The merge core reads values
back in two places only (`tensors.all_true`, `tensors.count`); they are answered here by shape.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from raymerge.merge import core, seeding, tensors
from raymerge.merge.engines import lowrank, svd_types
from raymerge.merge.engines.fast import FastEngine
from raymerge.merge.registry import METHODS, Form
from raymerge.task import MergeTask

MODULES = ("q", "v")
MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
"""Ops that put a tensor's values on a device (`.to(device)`): the one way onto the merge's
device from the host. A move may stay where it is or go to the merge's device, never leave it."""
STREAM_DRAWS = {
    seeding.draw_masks.__code__,
    seeding.bernoulli_mask.__code__,
    seeding.replay_peft_initialisation.__code__,
}
"""Where tensors are made on the CPU on purpose. By the seeding policy every random draw comes
from the CPU generator (`seeding.STREAM_DEVICE`), so that DARE's masks are PEFT's bit for bit on
any device: `draw_masks` draws on the CPU (uniforms compared with the density, as `bernoulli`
does), and `MaskStream` and `bernoulli_mask` then move the masks to the merge's device;
`replay_peft_initialisation` draws PEFT's CPU-made init
(`empty(device="cpu").uniform_()`) only to advance the stream, and uses nothing it makes. Inside
them a CPU result is legitimate; a mixed-device op is still not."""


class MixedDevices(AssertionError):
    """An op of the merge met, or made, a tensor off the merge's device."""


class SameDevice(TorchDispatchMode):
    """Fails any op that mixes devices, as CUDA would and meta does not always.

    For each op: the devices of its tensor arguments (0-dim CPU tensors aside: torch takes those
    as scalars on any device) must be one; what it returns must be on that device too, or, for
    an op with no tensor argument (a factory: `empty`, `zeros`, ...), on the merge's device.
    Moves (`MOVES`) may go to the merge's device; the seeding policy's draws (`STREAM_DRAWS`) may
    make CPU tensors. Python numbers made a tensor (`torch.tensor(weights)`: `lift_fresh` of a
    host tensor) are host data like the inputs before their move: they pass while they stay on
    the CPU, and fail the first op that meets the merge's tensors with them unmoved."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = torch.device(device).type
        self.ops = 0
        self._checking = True

    @contextlib.contextmanager
    def unchecked(self) -> Iterator[None]:
        """Ops that are not the merge's (a test planting a tensor) pass unchecked."""
        self._checking = False
        try:
            yield
        finally:
            self._checking = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._checking:
            return func(*args, **kwargs)
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in inputs if t.dim() or t.device.type != "cpu"}
        if not devices and inputs:  # only CPU scalars: host arithmetic on numbers
            devices = {"cpu"}
        if func is torch.ops.aten.copy_.default:  # the destination decides where it lands
            devices = {args[0].device.type}
        if len(devices) > 1:
            raise MixedDevices(f"{func} mixes devices {sorted(devices)}")
        out = func(*args, **kwargs)
        made = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        allowed = devices or {self.device}  # a factory makes its tensors on the merge's device
        if func in MOVES:
            allowed = allowed | {self.device}
        stray = made - allowed
        if stray and not (stray == {seeding.STREAM_DEVICE} and _in_a_stream_draw()):
            raise MixedDevices(f"{func} on {sorted(devices)} made tensors on {sorted(stray)}")
        return out


def _in_a_stream_draw() -> bool:
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code in STREAM_DRAWS:
            return True
        frame = frame.f_back
    return False


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
    inputs = _inputs("meta")
    with SameDevice("meta") as mode:
        merged = core.merge(_recipe(name), inputs, FastEngine(list(MODULES)))
    assert mode.ops > 0
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
            inputs = _inputs("meta")
            with SameDevice("meta"):
                fake = core.merge(recipe, inputs, FastEngine(list(MODULES)))
        real = core.merge(recipe, _inputs("cpu"), FastEngine(list(MODULES)))
        assert real.ran.device == "cpu"
        shapes = {k: t.shape for k, t in real.tensors.items()}
        assert {k: t.shape for k, t in fake.tensors.items()} == shapes


def test_masks_are_placed_on_the_device_of_what_they_mask():
    with seeding.seeded(0):
        masks = seeding.bernoulli_masks([torch.empty(3, 4, device="meta")], 0.5)
    assert masks[0].device.type == "meta" and masks[0].shape == (3, 4)


MULTIPLYING = sorted(
    name for name, method in METHODS.items() if method.form in (Form.LOWRANK, Form.DELTA_SVD)
)
"""The types whose engines multiply matrices: the low-rank engine's methods (`lowrank`), and the
fast engine's SVD types (its low-rank `svd`, the dense `*_svd`)."""


def plant_a_cpu_operand(monkeypatch, mode: SameDevice | None = None) -> list[str]:
    """The first matrix product an engine module computes (`a @ b` in `lowrank` or `svd_types`) gets
    one operand from the CPU, made outside the checks, as a tensor kept from an earlier CPU merge
    or built without `device=` would be. The operand chosen is the one torch then passes silently:
    the right one of a 2-d product (`mm` answers on the left's device), the left one of a batched
    product (`bmm` answers on the right's). Returns where it was planted."""
    product = torch.Tensor.__matmul__
    engines = {svd_types.__name__, lowrank.__name__}
    planted: list[str] = []

    def matmul(left, right):
        caller = inspect.currentframe().f_back
        if not planted and caller.f_globals.get("__name__") in engines:
            planted.append(f"{caller.f_globals['__name__']}.{caller.f_code.co_name}")
            with mode.unchecked() if mode else contextlib.nullcontext():
                if left.dim() == 2:
                    right = torch.empty_like(right, device="cpu")
                else:
                    left = torch.empty_like(left, device="cpu")
        return product(left, right)

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    return planted


@pytest.mark.parametrize("name", MULTIPLYING)
def test_a_cpu_operand_of_a_matrix_product_is_caught(valueless, monkeypatch, name):
    """Each engine path's first matrix product with a CPU operand fails the run. Unchecked, the
    same merge ends without an error with every tensor on meta: torch's `mm`/`bmm` on meta do
    not check devices, so without `SameDevice` the test above could not see it."""
    inputs = _inputs("meta")
    with SameDevice("meta") as mode:
        planted = plant_a_cpu_operand(monkeypatch, mode)
        with pytest.raises(MixedDevices, match=r"aten\.(mm|bmm)\.default mixes devices"):
            core.merge(_recipe(name), inputs, FastEngine(list(MODULES)))
    assert planted  # it was planted in the engine's own code, and that is what failed
