"""One policy for every random draw of a merge, shared by every engine.

A merge's randomness is DARE's Bernoulli(density) masks. Every mask is drawn from one stream:
**the CPU generator, seeded with the merge's own seed, consumed in PEFT's order** (first PEFT's
initialisation of the new adapter, which PEFT runs on the CPU, then the masks module by module),
and each mask is then moved to the device of the tensor it masks. The masks therefore depend on
the seed alone, not on where the tensors lie: the fast engine and PEFT's path draw the same masks
mask for mask on the CPU, on one GPU, or on a model sharded over several (where PEFT, left to
itself, would draw each layer's mask from that layer's own GPU generator).

Draws happen inside `seeded`, which leaves the caller's random state as it was.

Example:
    >>> import torch
    >>> like = torch.zeros(2, 3)
    >>> with seeded(7):
    ...     first = bernoulli_masks([like], density=0.5)[0]
    >>> with seeded(7):
    ...     again = bernoulli_masks([like.to("meta")], density=0.5)[0]  # another device
    >>> again.device.type, first.shape
    ('meta', torch.Size([2, 3]))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STREAM_DEVICE = "cpu"
"""Where every mask is drawn, whatever the device of the tensor it masks."""


@contextlib.contextmanager
def seeded(seed: int, enabled: bool = True) -> Iterator[None]:
    """The merge's stream: the CPU generator seeded with `seed`, restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[], enabled=enabled):
        if enabled:
            torch.default_generator.manual_seed(seed)
        yield


def bernoulli_mask(like: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's mask for `like`: Bernoulli(density) draws from the CPU stream, in `like`'s layout
    and dtype (as PEFT's `torch.full_like` gives), placed on `like`'s device."""
    import torch

    draws = torch.bernoulli(torch.full_like(like, density, device=STREAM_DEVICE))
    return draws.to(like.device)


def bernoulli_masks(tensors: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """One mask per tensor, in order. With density >= 1 PEFT prunes nothing and draws nothing."""
    import torch

    if density >= 1:
        return [torch.ones_like(t) for t in tensors]
    return [bernoulli_mask(t, density) for t in tensors]


def replay_peft_initialisation(
    shapes: Sequence[tuple[int, int]], init_lora_weights, new_rank: int
) -> None:
    """Consume the stream as PEFT's path does before it draws DARE masks.

    add_weighted_adapter first injects a new adapter into every target module (`shapes`: its
    (in_features, out_features), in module order): two nn.Linear layers made on the CPU, each
    initialised by kaiming_uniform_, then PEFT's own init of A (`init_lora_weights` of the first
    input). Drawing the same numbers puts the stream where PEFT's is when it draws the masks.
    """
    import torch

    for in_features, out_features in shapes:
        torch.empty(new_rank, in_features).uniform_()  # nn.Linear(in, r).reset_parameters()
        torch.empty(out_features, new_rank).uniform_()  # nn.Linear(r, out).reset_parameters()
        if init_lora_weights is True:
            torch.empty(new_rank, in_features).uniform_()  # kaiming_uniform_(lora_A)
        elif init_lora_weights == "gaussian":
            torch.empty(new_rank, in_features).normal_()


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """PEFT's `merge_utils.random_pruning` with its mask drawn by this policy (the PEFT engine
    puts it in PEFT's place while it merges)."""
    pruned = tensor * bernoulli_mask(tensor, density)
    return pruned / density if rescale else pruned
