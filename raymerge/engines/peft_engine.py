"""The reference path: PEFT's own `add_weighted_adapter` on a PeftModel holding the inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel

ENGINE = "peft"


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
