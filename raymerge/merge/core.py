"""The merge core: one function from a recipe and loaded inputs to the merged adapter.

`merge` runs the preferred engine where it is exact for these inputs, else the other one (PEFT's
path, built on first use: it needs the base model's weights), and the result says what ran:
engine, device, compute dtype and, when it fell back, why. No Ray, no storage: the worker,
`raymerge materialize` and the benches all call it, then hand the result to the publisher.

Example:
    >>> import torch
    >>> from peft import LoraConfig
    >>> from raymerge.merge.engines.fast import FastEngine
    >>> from raymerge.task import MergeTask
    >>> config = LoraConfig(r=2, lora_alpha=2, target_modules=["q"])
    >>> a = AdapterTensors("a", config, {"q": (torch.ones(2, 3), torch.ones(4, 2))})
    >>> b = AdapterTensors("b", config, {"q": (torch.ones(2, 3), torch.ones(4, 2))})
    >>> recipe = MergeTask("0123456789abcdef", ("a", "b"), (0.5, 0.5), "core_ta", {}, 0, 7,
    ...                    "float32")
    >>> merged = merge(recipe, [a, b], FastEngine(["q"]))
    >>> merged.ran.engine, merged.ran.compute_dtype, sorted(merged.tensors)[0]
    ('fast', 'float64', 'base_model.model.q.lora_A.weight')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from raymerge.errors import MergeError
from raymerge.merge.engines import Engine
from raymerge.merge.tensors import AdapterTensors, MergedAdapter, MergeRun

__all__ = ["AdapterTensors", "MergeRun", "MergedAdapter", "Recipe", "merge"]


class Recipe(Protocol):
    """A merge's identity: what `merge` needs to know (a `raymerge.task.MergeTask` is one)."""

    merge_id: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str
    params: dict[str, Any]
    merge_seed: int
    output_dtype: str


def merge(
    recipe: Recipe,
    inputs: Sequence[AdapterTensors],
    preferred: Engine,
    fallback: Callable[[], Engine] | None = None,
) -> MergedAdapter:
    """The merged adapter of `inputs` (in the recipe's order) as `recipe` says, in the output
    dtype: `preferred` where it is exact, else the engine `fallback` builds."""
    reason = preferred.unsupported(recipe, inputs)
    if reason is None:
        return preferred.merge(recipe, inputs)
    if fallback is None:
        raise MergeError(
            f"merge {recipe.merge_id}: the {preferred.name} engine does not handle {reason}, and "
            "no other engine is available here"
        )
    merged = fallback().merge(recipe, inputs)
    if merged.ran.engine == preferred.name:
        return merged
    why = f"the {preferred.name} engine does not handle {reason}"
    return dataclasses.replace(merged, ran=dataclasses.replace(merged.ran, fallback=why))
