"""Merge engines: each turns a recipe and loaded inputs into a `MergedAdapter` (tensors, config,
what ran). `fast` computes every type straight from the factors; `peft_engine` runs PEFT's own
`add_weighted_adapter`; `lowrank` holds the methods PEFT lacks and `reference` their dense
definitions. Which engine runs a merge is decided in one place: `raymerge.merge.core.merge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from raymerge.merge.tensors import AdapterTensors, MergedAdapter


class Engine(Protocol):
    name: str

    def unsupported(self, recipe, inputs: Sequence[AdapterTensors]) -> str | None:
        """Why this engine cannot merge these inputs exactly (None: it can)."""

    def merge(self, recipe, inputs: Sequence[AdapterTensors]) -> MergedAdapter: ...
