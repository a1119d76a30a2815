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


BLOCK = 1 << 22
"""Uniforms drawn per call when the stream is only advanced (a 16 MiB block, reused)."""


def draw_masks(count: int, density: float) -> torch.Tensor:
    """The stream's next `count` Bernoulli(density) draws: float32 0/1 on the CPU.

    PEFT's mask, `bernoulli(full_like(x, density))` for float32 `x`, keeps element i where the
    i-th float32 uniform of the stream is below float32(density): one 32-bit draw per element,
    in order, whatever the tensor's shape. Drawing the uniforms and comparing them gives the
    same masks as drawing mask by mask (tested), at the uniforms' cost alone (3.6x cheaper
    than `bernoulli` on the CPU)."""
    import torch

    masks = torch.empty(count, dtype=torch.float32, device=STREAM_DEVICE).uniform_()
    return torch.lt(masks, torch.tensor(density, dtype=torch.float32), out=masks)


class MaskStream:
    """A merge's DARE masks in stream order: `take(count)` gives the next `count`, float32 0/1
    on `device`. On the CPU each take draws its own, just before it is used (while it is in the
    cache); on another device every mask of the merge (`total`) is drawn in one call and moved
    in one copy, rather than one copy per tensor."""

    def __init__(self, total: int, density: float, device):
        import torch

        self._density = density
        self._taken = 0
        self._drawn = None
        if torch.device(device).type != STREAM_DEVICE:
            self._drawn = draw_masks(total, density).to(device)

    def take(self, count: int) -> torch.Tensor:
        if self._drawn is None:
            masks = draw_masks(count, self._density)
        else:
            masks = self._drawn[self._taken : self._taken + count]
        self._taken += count
        return masks


def bernoulli_mask(like: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's mask for `like`: Bernoulli(density) draws from the CPU stream, in `like`'s shape
    and dtype (as PEFT's `torch.full_like` gives), placed on `like`'s device."""
    import torch

    if like.dtype != torch.float32:  # the uniforms' identity is for float32 draws
        draws = torch.bernoulli(torch.full_like(like, density, device=STREAM_DEVICE))
        return draws.to(like.device)
    return draw_masks(like.numel(), density).view(like.shape).to(like.device)


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
    Uniform draws take one 32-bit number per element whatever the tensor, so they are drawn in
    blocks; a Gaussian init (normal_ draws in runs of 16) is replayed tensor by tensor."""
    import torch

    if init_lora_weights in (True, False):
        draws_of_a = 2 if init_lora_weights is True else 1  # nn.Linear's, then PEFT's init
        count = sum(
            new_rank * in_features * draws_of_a + out_features * new_rank
            for in_features, out_features in shapes
        )
        block = torch.empty(min(count, BLOCK), device=STREAM_DEVICE)
        for start in range(0, count, BLOCK):
            block[: min(BLOCK, count - start)].uniform_()
        return
    for in_features, out_features in shapes:
        torch.empty(new_rank, in_features).uniform_()  # nn.Linear(in, r).reset_parameters()
        torch.empty(out_features, new_rank).uniform_()  # nn.Linear(r, out).reset_parameters()
        if init_lora_weights == "gaussian":
            torch.empty(new_rank, in_features).normal_()


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """PEFT's `merge_utils.random_pruning` with its mask drawn by this policy (the PEFT engine
    puts it in PEFT's place while it merges)."""
    pruned = tensor * bernoulli_mask(tensor, density)
    return pruned / density if rescale else pruned
