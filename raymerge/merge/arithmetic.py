"""PEFT's per-element combinations (`peft.utils.merge_utils`), batched over modules.

Each function takes the inputs' tensors stacked as [N inputs, M modules, *shape] and returns the
combination per module, [M, *shape], with exactly PEFT's arithmetic per module: pruning keeps the
top values of each input's tensor for each module (not across modules), signs are elected per
element. DARE's random masks are drawn by the caller (in PEFT's order, so that both engines draw
the same ones) and passed in as `masks`.

Example:
    >>> import torch
    >>> stacked = torch.tensor([[[1.0, -2.0]], [[3.0, 4.0]]])  # 2 inputs, 1 module of 2 values
    >>> task_arithmetic(stacked, torch.tensor([0.5, 1.0]), {}).tolist()
    [[3.5, 3.0]]
    >>> magnitude_prune(stacked, torch.tensor([1.0, 1.0]), {"density": 0.5}).tolist()
    [[0.0, 2.0]]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where the arithmetic runs, not where the registry is read
    import torch

Combine = Callable[..., "torch.Tensor"]
"""(stacked [N, M, *shape], weights [N], params, masks=None) -> [M, *shape]."""


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _dense_enough(density: float) -> bool:
    if density >= 1:  # as PEFT: nothing to prune, and it says so
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            UserWarning,
            stacklevel=3,
        )
        return True
    return False


def prune_magnitude(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * size) largest magnitudes of each input's tensor for each module."""
    import torch

    if _dense_enough(density):
        return stacked
    flat = stacked.reshape(stacked.shape[0] * stacked.shape[1], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    if k:
        # The set PEFT's sorted top-k selects (the same selection, then a sort the mask does
        # not need): 3-4x faster on the CPU.
        top = torch.topk(flat.abs(), k=k, dim=1, largest=True, sorted=False)
        mask.scatter_(1, top.indices, 1.0)
    return stacked * mask.reshape(stacked.shape)


def prune_random(stacked: torch.Tensor, density: float, masks: torch.Tensor) -> torch.Tensor:
    """DARE: drop what `masks` (Bernoulli(density) draws) drops, rescale the rest by 1/density."""
    if _dense_enough(density):
        return stacked
    return (stacked * masks) / density


def elect_signs(pruned: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: where each input agrees with the majority sign of the element, over the inputs."""
    import torch

    sign = pruned.sign()
    magnitude = pruned.sum(dim=0) if method == "total" else sign.sum(dim=0)
    # PEFT's where(..., 1, -1) is int64, compared with the float signs: the same booleans
    # from a float where, without converting every element.
    return sign == torch.where(magnitude >= 0, 1.0, -1.0)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES: the mean over the inputs that agree with the elected sign."""
    import torch

    # As floats once (exact 0/1 and small counts), rather than promoted in the product and
    # counted as int64: the same values, the same division.
    agree = agree.to(weighted.dtype)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def task_arithmetic(stacked, weights, params: dict[str, Any], masks=None) -> torch.Tensor:
    return _weighted(stacked, weights).sum(dim=0)


def magnitude_prune(stacked, weights, params: dict[str, Any], masks=None) -> torch.Tensor:
    return _weighted(prune_magnitude(stacked, params["density"]), weights).sum(dim=0)


def ties(stacked, weights, params: dict[str, Any], masks=None) -> torch.Tensor:
    pruned = prune_magnitude(stacked, params["density"])
    agree = elect_signs(pruned, params.get("majority_sign_method", "total"))
    return disjoint_mean(_weighted(pruned, weights), agree)


def dare_linear(stacked, weights, params: dict[str, Any], masks=None) -> torch.Tensor:
    return _weighted(prune_random(stacked, params["density"], masks), weights).sum(dim=0)


def dare_ties(stacked, weights, params: dict[str, Any], masks=None) -> torch.Tensor:
    pruned = prune_random(stacked, params["density"], masks)
    agree = elect_signs(pruned, params.get("majority_sign_method", "total"))
    return disjoint_mean(_weighted(pruned, weights), agree)
