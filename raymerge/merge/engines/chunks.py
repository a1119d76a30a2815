"""How the fast engine walks a merge's modules: which are computed together (`groups`: the same
inputs present, with the same scalings and shapes), in which chunks (`chunks`: file order, sized
for the device), and their factors gathered (`stacked`, `stacked_inputs`).

Example:
    >>> keys(["layers.0.q"], "lora_A")
    ['base_model.model.layers.0.q.lora_A.weight']
"""

from __future__ import annotations

import re

import torch

from raymerge.merge.format import saved_key
from raymerge.merge.output import MergedOutput
from raymerge.merge.tensors import AdapterTensors

CHUNK_BYTES = 1 << 20
"""On the CPU, modules are computed together up to this many bytes of stacked inputs: every
intermediate of a chunk stays in the core's cache. A GPU takes each group in one piece (fewer
kernel launches beat cache locality there)."""


def chunks(group: list[str], present, output: MergedOutput) -> list[list[str]]:
    """A group's modules by kind (the same name but for layer numbers: `k_proj` apart from
    `v_proj` of the same shape), each kind in file order, so that a chunk's tensors lie evenly
    spaced in the output and are written in one copy; on the CPU cut into chunks of at most
    CHUNK_BYTES of stacked inputs."""
    kinds: dict[str, list[str]] = {}
    for module in sorted(group, key=lambda m: output.position(saved_key(m, "lora_A"))):
        kinds.setdefault(re.sub(r"\d+", "#", module), []).append(module)
    first = present[0][0].factors[group[0]]
    if whole_groups(first[0].device):
        return list(kinds.values())
    per_module = len(present) * sum(t.numel() * t.element_size() for t in first)
    size = max(1, CHUNK_BYTES // max(1, per_module))
    return [kind[i : i + size] for kind in kinds.values() for i in range(0, len(kind), size)]


def whole_groups(device) -> bool:
    """Whether the merge takes each kind of module in one piece (a GPU: few kernel launches
    beat cache locality) rather than in cache-sized chunks (the CPU)."""
    return device.type != "cpu"


def keys(modules: list[str], part: str) -> list[str]:
    """The saved keys of factor `part` of `modules`."""
    return [saved_key(module, part) for module in modules]


def inputs_at(adapters, weights, module: str) -> list[tuple[AdapterTensors, float]]:
    """The inputs that have `module`, with their weights."""
    return [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.factors]


def groups(adapters, weights, modules: list[str]) -> list[list[str]]:
    """Modules that can be computed together: the same inputs present, with the same scalings
    and factor shapes (in module order within each group)."""
    by_inputs: dict[tuple, list[str]] = {}
    for module in modules:
        key = tuple(
            (id(a), a.scaling(module), *shapes(a, module))
            for a, _ in inputs_at(adapters, weights, module)
        )
        by_inputs.setdefault(key, []).append(module)
    return list(by_inputs.values())


def stacked_factor(adapter: AdapterTensors, group: list[str], side: int) -> torch.Tensor:
    """One input's factor (0: A, 1: B) for every module of a group, stacked: [M, ...]."""
    return torch.stack([adapter.factors[m][side] for m in group])


def stacked_inputs(present, group: list[str], side: int) -> torch.Tensor:
    """Every input's factor for every module of a group: [N, M, ...], in one copy."""
    tensors = [a.factors[m][side] for a, _ in present for m in group]
    return torch.stack(tensors).view(len(present), len(group), *tensors[0].shape)


def pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int):
    """Zero rows of A and columns of B up to `rank` (batched [M, r, in] and [M, out, r])."""
    missing = rank - lora_a.shape[1]
    if missing > 0:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(lora_a.shape[0], missing, lora_a.shape[2])], 1)
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], lora_b.shape[1], missing)], 2)
    return lora_a, lora_b


def shapes(adapter: AdapterTensors, module: str) -> tuple:
    """The shapes of an input's factors at `module`."""
    a, b = adapter.factors[module]
    return tuple(a.shape), tuple(b.shape)
