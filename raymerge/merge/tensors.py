"""The merge core's data: one input adapter's tensors, a merged adapter, and what ran to make it.

Example:
    >>> import torch
    >>> ran = MergeRun(engine="fast", device="cpu", compute_dtype="float32")
    >>> merged = MergedAdapter({"k": torch.zeros(2)}, {"r": 2}, ran)
    >>> merged.ran.compute_dtype, merged.ran.fallback
    ('float32', None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymerge.errors import MergeError

if TYPE_CHECKING:  # the registry reads this package: torch only where merges run
    import torch


@dataclass(frozen=True)
class AdapterTensors:
    """One input adapter, ready to merge: its config and, per module, (A, B) in float32."""

    name: str
    config: Any
    """Its peft.LoraConfig, as PEFT holds it once loaded (fan_in_fan_out set by layer type)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name (relative to the model) -> (lora_A, lora_B)."""
    folder: Path | None = None
    """The local folder it was read from (PEFT's path loads it from there)."""
    embedding: frozenset[str] = frozenset()
    """Modules whose factors are embedding LoRAs (lora_embedding_A/B)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Location and digests, for merge.json."""

    @property
    def rank(self) -> int:
        """The largest rank, by which PEFT sizes merged factors."""
        return max([self.config.r, *(self.config.rank_pattern or {}).values()])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    def scaling(self, module: str) -> float:
        """The module's LoRA scaling as PEFT computes it (rank/alpha patterns, rsLoRA)."""
        from peft.utils.other import get_pattern_key

        config = self.config
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern, module), config.lora_alpha
        )
        return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


@dataclass(frozen=True)
class MergeRun:
    """What actually ran to make a merge: merge.json records this, not what was asked for."""

    engine: str
    device: str
    """Where the merged factors were computed (devices joined by ',' for a sharded model)."""
    compute_dtype: str
    """The precision the merged factors were computed and held in before the output cast."""
    fallback: str | None = None
    """Why the preferred engine handed this merge to another one."""


@dataclass(frozen=True)
class MergedAdapter:
    """A merged adapter as tensors: serialising, hashing and writing it is the publisher's job."""

    tensors: dict[str, torch.Tensor]
    """Saved key -> tensor in the output dtype, exactly as save_pretrained would write it."""
    config: dict[str, Any]
    """adapter_config.json's object."""
    ran: MergeRun
    file: Any = None
    """The weights file as one buffer (`merge.output.FileBuffer`) when the engine wrote the tensors
    into one (they are views of it), else None."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32'."""
    return str(dtype).removeprefix("torch.")


def all_true(mask: torch.Tensor) -> bool:
    """Whether every element of a boolean tensor is true: with `count`, the only places the merge
    core reads a value back from its device (a sync). Tests on devices without values (`meta`)
    put their own in their place."""
    return bool(mask.all())


def count(mask: torch.Tensor) -> int:
    """How many elements of a boolean tensor are true (see `all_true`)."""
    return int(mask.sum())


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """MergeError naming the first tensor holding NaN or Inf.

    One value read per device on the way through: a finite sum means every element is finite
    (NaN and Inf propagate through it), and the sums' flags are read together. Only where some
    sum is not finite (an overflow of large finite values, or a real NaN) are the tensors read
    one by one."""
    import torch

    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors.values():
        flags.setdefault(tensor.device, []).append(torch.isfinite(tensor.sum()))
    if all(all_true(torch.stack(on_device)) for on_device in flags.values()):
        return
    for key, tensor in tensors.items():
        if not all_true(torch.isfinite(tensor)):
            bad = count(~torch.isfinite(tensor))
            raise MergeError(
                f"{what}: {key} holds {bad} non-finite value(s) (NaN or Inf); nothing was written"
            )
