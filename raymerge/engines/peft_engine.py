"""The reference path: PEFT's own `add_weighted_adapter` on a PeftModel holding the inputs,
with the fixes that make its result exactly what merge.json says."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

ENGINE = "peft"
COMPUTE_DTYPE = torch.float32


def add_merged_adapter(
    model: PeftModel,
    merged_name: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
) -> None:
    """Add adapter `merged_name` to `model`: the merge of its loaded `adapters`.

    PEFT's DARE types draw their masks from torch's global RNG, so it is seeded with the merge's
    own seed first: the same merge gives the same adapter on the same device, whatever ran before.

    Example:
        >>> add_merged_adapter(model, "m", ["a", "b"], [0.5, 0.5], "linear", {}, seed=0)
        ...  # doctest: +SKIP
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"add_weighted_adapter needs a peft.PeftModel, got {type(model).__name__}; wrap the "
            "base model with PeftModel.from_pretrained(base, adapter_path) first"
        )
    torch.manual_seed(seed)
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


def _use_unit_scaling(model: PeftModel, name: str) -> None:
    """The merged factors already carry each input's scaling, so the merge must scale by 1.

    PEFT sets lora_alpha = r for that, but copies use_rslora from the first input: rsLoRA then
    scales by alpha/sqrt(r) = sqrt(r), and the written adapter is off by that factor.
    """
    config = model.peft_config[name]
    config.use_rslora = False
    for module in _lora_layers(model, name):
        module.scaling[name] = config.lora_alpha / config.r


def _make_config_deterministic(model: PeftModel, name: str) -> None:
    """PEFT writes set-valued fields (the union of target_modules) in hash order, which changes
    from process to process; sorted lists make the same merge give the same bytes."""
    config = model.peft_config[name]
    for field, value in vars(config).items():
        if isinstance(value, set):
            setattr(config, field, sorted(value))


def _positive_zeros(model: PeftModel, name: str) -> None:
    """PEFT zeroes the new factors by multiplying random ones by 0.0, leaving -0.0 in padding;
    adding 0.0 makes every zero +0.0 (values unchanged), so both engines write the same bytes."""
    for module in _lora_layers(model, name):
        for factors in (module.lora_A, module.lora_B):
            if name in factors:
                factors[name].weight.data = factors[name].weight.data + 0.0
        for factors in (module.lora_embedding_A, module.lora_embedding_B):
            if name in factors:
                factors[name].data = factors[name].data + 0.0


def cast_adapter(model: PeftModel, name: str, dtype: torch.dtype) -> None:
    """Cast one adapter's LoRA factors in place (float32 to merge; the output dtype to save)."""
    for module in _lora_layers(model, name):
        for factors in (module.lora_A, module.lora_B):
            if name in factors:
                factors[name].weight.data = factors[name].weight.data.to(dtype)
        for factors in (module.lora_embedding_A, module.lora_embedding_B):
            if name in factors:
                factors[name].data = factors[name].data.to(dtype)


def adapter_bytes(model: PeftModel, name: str) -> int:
    """Memory one loaded adapter's factors take."""
    total = 0
    for module in _lora_layers(model, name):
        for factors in (module.lora_A, module.lora_B):
            if name in factors:
                weight = factors[name].weight
                total += weight.numel() * weight.element_size()
        for factors in (module.lora_embedding_A, module.lora_embedding_B):
            if name in factors:
                total += factors[name].numel() * factors[name].element_size()
    return total


def _lora_layers(model: PeftModel, name: str) -> Iterator[LoraLayer]:
    for module in model.modules():
        if isinstance(module, LoraLayer) and (
            name in module.lora_A or name in module.lora_embedding_A
        ):
            yield module
