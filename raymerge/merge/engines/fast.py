"""The fast engine: every combination type computed straight from the adapters' tensors, with
PEFT's own arithmetic in PEFT's module order, batched over modules of equal shapes. Adapter
tensors and configs in, the merged adapter's tensors and config out. No Ray, no storage.

Example:
    >>> import torch
    >>> from peft import LoraConfig
    >>> from raymerge.merge.registry import METHODS
    >>> config = LoraConfig(r=2, lora_alpha=2, target_modules=["q"])
    >>> a = AdapterTensors("a", config, {"q": (torch.ones(2, 3), torch.ones(4, 2))})
    >>> b = AdapterTensors("b", config, {"q": (torch.ones(2, 3), -torch.ones(4, 2))})
    >>> state, merged = merge_tensors([a, b], [1.0, 1.0], METHODS["cat"], {}, seed=0,
    ...                              layout=["q"])
    >>> delta = state[saved_key("q", "lora_B")] @ state[saved_key("q", "lora_A")]
    >>> merged.r, float(delta.abs().sum())
    (4, 0.0)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch

from raymerge.merge import arithmetic, seeding
from raymerge.merge.engines import chunks as chunking
from raymerge.merge.engines.chunks import (
    chunks,
    groups,
    inputs_at,
    keys,
    pad_rank,
    stacked_factor,
    stacked_inputs,
)
from raymerge.merge.engines.svd_types import delta_svd, lowrank_types
from raymerge.merge.format import config_dict, saved_key
from raymerge.merge.layout import Layout, peft_fan_in_fan_out
from raymerge.merge.output import MergedOutput
from raymerge.merge.registry import METHODS, Form, Method
from raymerge.merge.tensors import AdapterTensors, MergedAdapter, MergeRun, dtype_name

ENGINE = "fast"


class FastEngine:
    """The fast engine bound to one base model's layout (module order, layer kinds)."""

    name = ENGINE

    def __init__(self, layout: Layout | Sequence[str], config_cache_entries: int = 256):
        self.layout = layout
        self._configs: dict[tuple, dict[str, Any]] = {}
        self._config_cache_entries = config_cache_entries

    def unsupported(self, recipe, inputs: Sequence[AdapterTensors]) -> str | None:
        return unsupported(inputs, METHODS[recipe.combination_type])

    def merge(self, recipe, inputs: Sequence[AdapterTensors]) -> MergedAdapter:
        method = METHODS[recipe.combination_type]
        output, config = merge_into(
            inputs,
            recipe.weights,
            method,
            recipe.params,
            recipe.merge_seed,
            self.layout,
            recipe.output_dtype,
            f"merge {recipe.merge_id}",
        )
        first = next(iter(inputs[0].factors.values()))[0]
        ran = MergeRun(ENGINE, str(first.device), compute_dtype(method, first.dtype))
        # Converting a config to its JSON object costs more than a small merge: the same inputs
        # give the same config (up to the rank), so it is made once.
        key = (tuple(a.name for a in inputs), config.r)
        if key not in self._configs:
            if len(self._configs) >= self._config_cache_entries:
                self._configs.pop(next(iter(self._configs)))
            self._configs[key] = config_dict(config)
        return MergedAdapter(output.tensors, self._configs[key], ran, file=output.file)


def compute_dtype(method: Method, factor_dtype: torch.dtype) -> str:
    """The precision a merge's arithmetic runs in: the methods PEFT lacks work in float64 (their
    matrices are small), every other type in the inputs' factor dtype (float32 as loaded)."""
    return "float64" if method.form is Form.LOWRANK else dtype_name(factor_dtype)


def unsupported(adapters: Sequence[AdapterTensors], method: Method) -> str | None:
    """Why the fast engine cannot merge these adapters exactly (PEFT's path then runs)."""
    init = adapters[0].config.init_lora_weights
    if method.random and init not in (True, False, "gaussian"):
        return f"DARE masks after init_lora_weights={init!r} (it could not draw PEFT's masks)"
    for adapter in adapters:
        if adapter.embedding:
            return "embedding targets (PEFT also writes the base embedding beside them)"
        if any(a.dim() != 2 for a, _ in adapter.factors.values()):
            return "convolution targets"
    kinds = {type(adapter.config.target_modules) for adapter in adapters}
    if len(kinds) > 1:
        return "target_modules mixing lists and regular expressions"
    return None


def merge_tensors(
    adapters: Sequence[AdapterTensors],
    weights: Sequence[float],
    method: Method,
    params: dict[str, Any],
    seed: int,
    layout: Layout | Sequence[str],
) -> tuple[dict[str, torch.Tensor], Any]:
    """The merged adapter's tensors (as PEFT saves them, float32) and its config."""
    output, config = merge_into(adapters, weights, method, params, seed, layout)
    return output.tensors, config


def merge_into(
    adapters: Sequence[AdapterTensors],
    weights: Sequence[float],
    method: Method,
    params: dict[str, Any],
    seed: int,
    layout: Layout | Sequence[str],
    output_dtype: str = "float32",
    what: str = "merge",
) -> tuple[MergedOutput, Any]:
    """The merged adapter written into its weights file's buffer (in `output_dtype`, checked
    finite with one value read), and its config.

    `layout` (or just the module order) is the base model's: PEFT walks modules in
    `named_modules()` order, and the random types draw their masks in that order, from `seed`, to
    match it. Draws happen in a forked RNG: the worker's own random state is left as it was.
    """
    import torch

    if not isinstance(layout, Layout):
        layout = Layout("", tuple(layout), {})
    new_rank = method.merged_rank([a.rank for a in adapters], params)
    position = {name: i for i, name in enumerate(layout.order)}
    modules = sorted(
        {m for adapter in adapters for m in adapter.factors},
        key=lambda m: (position.get(m, len(position)), m),
    )
    first = next(iter(adapters[0].factors.values()))[0]
    shapes = _output_shapes(adapters, modules, method, new_rank)
    output = MergedOutput(shapes, getattr(torch, output_dtype), first.device)
    try:
        with seeding.seeded(seed, enabled=method.random):
            if method.random and method.peft:
                _replay_peft_initialisation(adapters, modules, new_rank)
            if method.form is Form.CONCAT:
                _cat(adapters, weights, modules, new_rank, output)
            elif method.form is Form.LOWRANK:
                lowrank_types(adapters, weights, modules, method, params, new_rank, output)
            elif method.form is Form.DELTA_SVD:
                delta_svd(adapters, weights, modules, method, params, new_rank, layout, output)
            else:
                _factorwise(adapters, weights, modules, method, params, output)
    except torch.linalg.LinAlgError:
        output.check(what)  # a factorisation of non-finite input: say that instead
        raise
    output.check(what)
    config = merged_config(adapters, new_rank)
    config.fan_in_fan_out = peft_fan_in_fan_out(config.fan_in_fan_out, modules, layout)
    return output, config


def merged_config(adapters: Sequence[AdapterTensors], new_rank: int):
    """PEFT's merged config (the first input's, with r = lora_alpha = the new rank and the union
    of target modules), with use_rslora off (the factors carry the scaling) and target_modules
    sorted (so that the file's bytes do not depend on hash order)."""
    first = adapters[0].config
    if isinstance(first.target_modules, str):
        targets: Any = "|".join(f"({a.config.target_modules})" for a in adapters)
    else:
        targets = sorted(reduce(operator.or_, (set(a.config.target_modules) for a in adapters)))
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=targets,
        alpha_pattern={},
        rank_pattern={},
    )
    config.use_rslora = False
    config.target_modules = targets
    config.inference_mode = True
    return config


def _output_shapes(adapters, modules: list[str], method: Method, new_rank: int):
    """Saved key -> the merged tensor's shape: the inputs' rank for the per-element types, the
    SVD types' rank capped by the module's dimensions (a delta has no more), else `new_rank`."""
    shapes = {}
    for module in modules:
        a, b = next(x.factors[module] for x in adapters if module in x.factors)
        in_features, out_features = a.shape[1], b.shape[0]
        rank = new_rank
        if method.form is Form.FACTORWISE:
            rank = a.shape[0]
        elif method.form is Form.DELTA_SVD:
            rank = min(new_rank, in_features, out_features)
        shapes[saved_key(module, "lora_A")] = (rank, in_features)
        shapes[saved_key(module, "lora_B")] = (out_features, rank)
    return shapes


def _replay_peft_initialisation(adapters, modules: list[str], new_rank: int) -> None:
    """Put the stream where PEFT's path has it when it draws the first mask (`seeding`)."""
    shapes = []
    for module in modules:
        a, b = next(x.factors[module] for x in adapters if module in x.factors)
        shapes.append((a.shape[1], b.shape[0]))
    seeding.replay_peft_initialisation(shapes, adapters[0].config.init_lora_weights, new_rank)


def _cat(adapters, weights, modules: list[str], new_rank: int, output: MergedOutput) -> None:
    """Stacked factors: A_i scaled by w_i * s_i, zero rows up to the summed rank (as PEFT), for
    the modules of a chunk at once."""
    for group in groups(adapters, weights, modules):
        present = inputs_at(adapters, weights, group[0])
        for chunk in chunks(group, present, output):
            scaled = [stacked_factor(a, chunk, 0) * w * a.scaling(chunk[0]) for a, w in present]
            lora_a = torch.cat(scaled, dim=1)
            lora_b = torch.cat([stacked_factor(a, chunk, 1) for a, _ in present], dim=2)
            lora_a, lora_b = pad_rank(lora_a, lora_b, new_rank)
            output.put(keys(chunk, "lora_A"), lora_a)
            output.put(keys(chunk, "lora_B"), lora_b)


def _factor_weights(present, module: str) -> tuple[list[float], list[float]]:
    """PEFT's per-input weights for combining A's and B's: sqrt(|w s|), the sign on A's side."""
    weights_a, weights_b = [], []
    for adapter, weight in present:
        scaled = weight * adapter.scaling(module)
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    return weights_a, weights_b


def _factorwise(adapters, weights, modules: list[str], method: Method, params, output) -> None:
    """linear, ties, dare_*, magnitude_prune: the A's and the B's combined separately, each input
    weighted by sqrt(|w s|) (the sign on A's side), exactly as PEFT does, for the modules of a
    chunk at once (pruning stays per module)."""
    if method.random:
        _factorwise_random(adapters, weights, modules, method, params, output)
        return
    for group in groups(adapters, weights, modules):
        present = inputs_at(adapters, weights, group[0])
        device = present[0][0].factors[group[0]][0].device
        side_weights = [torch.tensor(w).to(device) for w in _factor_weights(present, group[0])]
        for chunk in chunks(group, present, output):
            for side, part in enumerate(("lora_A", "lora_B")):
                weight = side_weights[side]
                if method.combine is arithmetic.task_arithmetic and len(chunk) == 1:
                    merged = _weighted_sum(present, chunk, side, weight)
                else:
                    stacked = stacked_inputs(present, chunk, side)
                    merged = method.combine(stacked, weight, params, None)
                output.put(keys(chunk, part), merged)


def _weighted_sum(present, chunk: list[str], side: int, weight: torch.Tensor) -> torch.Tensor:
    """task_arithmetic's `(stacked * weight).sum(0)` with each input multiplied straight into
    its slot of the weighted stack: the same products, summed by the same call, in one pass
    over the inputs where stacking then weighting takes two. For a chunk of one module, whose
    inputs are large (passes cost); small modules in larger chunks stack in one call (calls
    cost), as does a GPU's whole group."""
    first = present[0][0].factors[chunk[0]][side]
    weighted = first.new_empty((len(present), len(chunk), *first.shape))
    for i, (adapter, _) in enumerate(present):
        for j, module in enumerate(chunk):
            torch.mul(adapter.factors[module][side], weight[i], out=weighted[i, j])
    return weighted.sum(dim=0)


def _factorwise_random(adapters, weights, modules: list[str], method: Method, params, output):
    """DARE: the masks are the stream's draws in PEFT's order (module by module, A's then B's,
    input by input). On the CPU each module is merged as its masks are drawn; elsewhere every
    mask is drawn at once (`seeding.MaskStream`) and a chunk of modules takes its masks as views
    of that one draw, stacked in one copy."""
    density = params["density"]
    order = [(m, side, inputs_at(adapters, weights, m)) for m in modules for side in (0, 1)]
    first = next(iter(adapters[0].factors.values()))[0]
    total = sum(len(p) * p[0][0].factors[m][side].numel() for m, side, p in order)
    # PEFT prunes nothing and draws nothing at density 1
    stream = seeding.MaskStream(total, density, first.device) if density < 1 else None
    if stream is None or not chunking.whole_groups(first.device):
        for module, side, present in order:
            stacked = stacked_inputs(present, [module], side)
            masks = None if stream is None else stream.take(stacked.numel()).view(stacked.shape)
            weight = torch.tensor(_factor_weights(present, module)[side]).to(stacked.device)
            merged = method.combine(stacked, weight, params, masks)
            output.put(keys([module], ("lora_A", "lora_B")[side]), merged)
        return
    drawn, starts, start = stream.take(total), {}, 0
    for module, side, present in order:
        starts[module, side] = start
        start += len(present) * present[0][0].factors[module][side].numel()
    for group in groups(adapters, weights, modules):
        present = inputs_at(adapters, weights, group[0])
        side_weights = _factor_weights(present, group[0])
        for chunk in chunks(group, present, output):
            for side, part in enumerate(("lora_A", "lora_B")):
                stacked = stacked_inputs(present, chunk, side)
                shape, size = stacked[:, 0].shape, stacked[:, 0].numel()
                views = [drawn[starts[m, side] : starts[m, side] + size].view(shape) for m in chunk]
                weight = torch.tensor(side_weights[side]).to(stacked.device)
                merged = method.combine(stacked, weight, params, torch.stack(views, dim=1))
                output.put(keys(chunk, part), merged)
