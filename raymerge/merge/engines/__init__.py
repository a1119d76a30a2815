"""Merge engines: pure functions over adapters' tensors and configs (no Ray, no storage).

Both engines take a task and its loaded inputs and give the merged adapter's files. `merge`
decides which one runs: the fast engine unless it cannot merge these inputs exactly, in which
case PEFT's path runs and the result says why (`fallback`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from raymerge.errors import MergeError

if TYPE_CHECKING:  # the registry (methods) reads this package: torch only where merges run
    import torch

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


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
class MergedAdapter:
    """A merged adapter's files, and how they were made."""

    files: dict[str, bytes]
    """File name -> bytes, as PEFT's save_pretrained writes them."""
    engine: str
    fallback: str | None = None
    """Why the fast engine handed this merge to PEFT's path."""


class Engine(Protocol):
    name: str

    def unsupported(self, task, inputs: Sequence[AdapterTensors]) -> str | None:
        """Why this engine cannot merge these inputs exactly (None: it can)."""

    def merge(self, task, inputs: Sequence[AdapterTensors]) -> MergedAdapter: ...


def merge(
    task, inputs: Sequence[AdapterTensors], preferred: Engine, reference: Callable[[], Engine]
) -> MergedAdapter:
    """Merge with `preferred` where it is exact, else with the reference engine (PEFT's path,
    built on first use: it needs the base model's weights)."""
    reason = preferred.unsupported(task, inputs)
    if reason is None:
        return preferred.merge(task, inputs)
    merged = reference().merge(task, inputs)
    if preferred.name == merged.engine:
        return merged
    return MergedAdapter(merged.files, merged.engine, f"the {preferred.name} engine does not "
                         f"handle {reason}")  # fmt: skip


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """MergeError naming the first tensor holding NaN or Inf."""
    import torch

    for key, tensor in tensors.items():
        # A finite sum means every element is finite (NaN and Inf propagate through it); only a
        # sum that is not (an overflow of large finite values, or a real NaN) is looked at closely.
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeError(
                f"{what}: {key} holds {bad} non-finite value(s) (NaN or Inf); nothing was written"
            )


def scaled_output(
    state: dict[str, torch.Tensor], output_dtype: str, what: str
) -> dict[str, torch.Tensor]:
    """The merged tensors in the output dtype, refusing NaN/Inf (also from a narrowing cast)."""
    import torch

    check_finite(state, what)
    dtype = getattr(torch, output_dtype)
    out = {k: v.to(dtype) for k, v in state.items()}
    if dtype != torch.float32:
        check_finite(out, f"{what} in {output_dtype}")
    return out
