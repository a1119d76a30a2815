"""The reference path: PEFT's own `add_weighted_adapter` on a PeftModel holding the inputs,
with the fixes that make its result exactly what merge.json says."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from raymerge.merge import seeding
from raymerge.merge.format import CONFIG_FILE, WEIGHTS_FILE, parse_config, parse_weights
from raymerge.merge.registry import METHODS
from raymerge.merge.tensors import AdapterTensors, MergedAdapter, MergeRun, dtype_name

ENGINE = "peft"
COMPUTE_DTYPE = torch.float32


class PeftEngine:
    """PEFT's path on the worker's PeftModel. Inputs are loaded into it once, in float32, and
    stay until `forget`; `load_into_peft(folder, name)` returns the PeftModel (wrapping the base
    model on first use) and `charge(name, bytes)` counts each copy against the adapter cache."""

    name = ENGINE

    def __init__(
        self,
        load_into_peft: Callable[[Path, str], Any],
        charge: Callable[[str, int], None] = lambda name, size: None,
        check_input: Callable[[AdapterTensors], None] = lambda adapter: None,
    ):
        self._load_into_peft = load_into_peft
        self._charge = charge
        self._check_input = check_input
        self._model = None
        self._loaded: dict[str, str] = {}  # adapter name -> PEFT's name for it
        self._names = itertools.count()

    def unsupported(self, recipe, inputs: Sequence[AdapterTensors]) -> str | None:
        if not METHODS[recipe.combination_type].peft:
            return f"{recipe.combination_type} (not one of PEFT's combination types)"
        return None

    def merge(self, recipe, inputs: Sequence[AdapterTensors]) -> MergedAdapter:
        names = [self.ensure(adapter) for adapter in inputs]
        merged = f"merge_{recipe.merge_id}"
        try:
            add_merged_adapter(
                self._model,
                merged,
                names,
                recipe.weights,
                recipe.combination_type,
                recipe.params,
                recipe.merge_seed,
            )
            ran = MergeRun(ENGINE, *_held_as(self._model, merged))
            cast_adapter(self._model, merged, getattr(torch, recipe.output_dtype))
            tensors, config = _saved(self._model, merged)
        finally:
            if merged in self._model.peft_config:
                self._model.delete_adapter(merged)  # memory must not grow with the sweep
        return MergedAdapter(tensors, config, ran)

    def ensure(self, adapter: AdapterTensors) -> str:
        """PEFT's name for `adapter`, loading it into the PeftModel (float32) the first time."""
        if adapter.name not in self._loaded:
            self._check_input(adapter)
            # PEFT keeps adapters in ModuleDicts, whose keys cannot hold '.': use our own names.
            peft_name = f"adapter_{next(self._names)}"
            self._model = self._load_into_peft(adapter.folder, peft_name)
            cast_adapter(self._model, peft_name, COMPUTE_DTYPE)
            self._loaded[adapter.name] = peft_name
            self._charge(adapter.name, adapter_bytes(self._model, peft_name))
        return self._loaded[adapter.name]

    def forget(self, name: str) -> None:
        """The cache dropped adapter `name`: drop PEFT's copy too."""
        peft_name = self._loaded.pop(name, None)
        if peft_name is not None:
            self._model.delete_adapter(peft_name)


def _held_as(model, name: str) -> tuple[str, str]:
    """(devices, dtype) of adapter `name`'s factors as PEFT made them: PEFT computes a merge
    into factors of the base layer's dtype (on a bf16 base, `cat` and the svd types come out
    rounded to bf16 before any output cast), so that is the precision the merge ran in."""
    tensors = [tensor for _, _, tensor in _factor_tensors(model, name)]
    devices = ",".join(sorted({str(t.device) for t in tensors}))
    dtypes = sorted({t.dtype for t in tensors}, key=lambda d: torch.finfo(d).bits)
    return devices, dtype_name(dtypes[0])  # the narrowest one bounds the result's precision


def _saved(model, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter `name`'s tensors and config exactly as PEFT's own save_pretrained writes them
    (its writer decides the keys, the embedding copies and the config's fields)."""
    with tempfile.TemporaryDirectory(prefix="raymerge-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        folder = Path(tmp) / name
        return (
            parse_weights((folder / WEIGHTS_FILE).read_bytes()),
            parse_config((folder / CONFIG_FILE).read_bytes()),
        )


@contextlib.contextmanager
def _masks_by_policy() -> Iterator[None]:
    """PEFT draws each DARE mask on its layer's device; while it merges, it draws them by the
    seeding policy instead (the CPU stream), as the fast engine does, so both engines give the
    same masks on any device layout. One merge at a time per process, so the swap is safe."""
    from peft.utils import merge_utils

    original = merge_utils.random_pruning
    merge_utils.random_pruning = seeding.random_pruning
    try:
        yield
    finally:
        merge_utils.random_pruning = original


def add_merged_adapter(
    model,
    merged_name: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
) -> None:
    """Add adapter `merged_name` to `model`: the merge of its loaded `adapters`.

    PEFT's DARE types draw their masks from torch's global RNG: they are drawn by the seeding
    policy (`raymerge.merge.seeding`: the CPU stream, seeded with the merge's own seed), so the
    same merge gives the same adapter whatever ran before and wherever its layers lie, and the
    caller's random state is left as it was.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"add_weighted_adapter needs a peft.PeftModel, got {type(model).__name__}; wrap the "
            "base model with PeftModel.from_pretrained(base, adapter_path) first"
        )
    with seeding.seeded(seed), _masks_by_policy():
        model.add_weighted_adapter(
            adapters=list(adapters),
            weights=[float(w) for w in weights],
            adapter_name=merged_name,
            combination_type=combination_type,
            **params,
        )
    _use_unit_scaling(model, merged_name)
    _make_config_deterministic(model, merged_name)
    _positive_zeros(model, merged_name)


def _use_unit_scaling(model, name: str) -> None:
    """The merged factors already carry each input's scaling, so the merge must scale by 1.

    PEFT sets lora_alpha = r for that, but copies use_rslora from the first input: rsLoRA then
    scales by alpha/sqrt(r) = sqrt(r), and the written adapter is off by that factor.
    """
    config = model.peft_config[name]
    config.use_rslora = False
    for module in _lora_layers(model, name):
        module.scaling[name] = config.lora_alpha / config.r


def _make_config_deterministic(model, name: str) -> None:
    """PEFT writes set-valued fields (the union of target_modules) in hash order, which changes
    from process to process; sorted lists make the same merge give the same bytes."""
    config = model.peft_config[name]
    for field, value in vars(config).items():
        if isinstance(value, set):
            setattr(config, field, sorted(value))


def _factor_tensors(model, name: str) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """(holder, attribute, tensor) of every LoRA factor of adapter `name`."""
    for module in _lora_layers(model, name):
        for factors in (module.lora_A, module.lora_B):
            if name in factors:
                yield factors[name].weight, "data", factors[name].weight.data
        for factors in (module.lora_embedding_A, module.lora_embedding_B):
            if name in factors:
                yield factors[name], "data", factors[name].data


def _positive_zeros(model, name: str) -> None:
    """PEFT zeroes the new factors by multiplying random ones by 0.0, leaving -0.0 in padding;
    adding 0.0 makes every zero +0.0 (values unchanged), so both engines write the same bytes."""
    for holder, attribute, tensor in list(_factor_tensors(model, name)):
        setattr(holder, attribute, tensor + 0.0)


def cast_adapter(model, name: str, dtype: torch.dtype) -> None:
    """Cast one adapter's LoRA factors in place (float32 to merge; the output dtype to save)."""
    for holder, attribute, tensor in list(_factor_tensors(model, name)):
        setattr(holder, attribute, tensor.to(dtype))


def adapter_bytes(model, name: str) -> int:
    """Memory one loaded adapter's factors take."""
    return sum(t.numel() * t.element_size() for _, _, t in _factor_tensors(model, name))


def _lora_layers(model, name: str):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and (
            name in module.lora_A or name in module.lora_embedding_A
        ):
            yield module
