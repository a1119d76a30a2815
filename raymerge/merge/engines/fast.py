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

from raymerge.errors import MergeError
from raymerge.merge import seeding, tensors
from raymerge.merge.format import config_dict, saved_key
from raymerge.merge.layout import Layout, peft_fan_in_fan_out
from raymerge.merge.registry import METHODS, Form, Method
from raymerge.merge.tensors import (
    AdapterTensors,
    MergedAdapter,
    MergeRun,
    dtype_name,
    scaled_output,
)

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
        state, config = merge_tensors(
            inputs, recipe.weights, method, recipe.params, recipe.merge_seed, self.layout
        )
        first = next(iter(inputs[0].factors.values()))[0]
        ran = MergeRun(ENGINE, str(first.device), compute_dtype(method, first.dtype))
        state = scaled_output(state, recipe.output_dtype, f"merge {recipe.merge_id}")
        # Converting a config to its JSON object costs more than a small merge: the same inputs
        # give the same config (up to the rank), so it is made once.
        key = (tuple(a.name for a in inputs), config.r)
        if key not in self._configs:
            if len(self._configs) >= self._config_cache_entries:
                self._configs.pop(next(iter(self._configs)))
            self._configs[key] = config_dict(config)
        return MergedAdapter(state, self._configs[key], ran)


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
    """The merged adapter's tensors (as PEFT saves them, float32) and its config.

    `layout` (or just the module order) is the base model's: PEFT walks modules in
    `named_modules()` order, and the random types draw their masks in that order, from `seed`, to
    match it. Draws happen in a forked RNG: the worker's own random state is left as it was.
    """
    if not isinstance(layout, Layout):
        layout = Layout("", tuple(layout), {})
    new_rank = method.merged_rank([a.rank for a in adapters], params)
    position = {name: i for i, name in enumerate(layout.order)}
    modules = sorted(
        {m for adapter in adapters for m in adapter.factors},
        key=lambda m: (position.get(m, len(position)), m),
    )
    with seeding.seeded(seed, enabled=method.random):
        if method.random and method.peft:
            _replay_peft_initialisation(adapters, modules, new_rank)
        if method.form is Form.CONCAT:
            state = _cat(adapters, weights, modules, new_rank)
        elif method.form is Form.LOWRANK:
            state = _lowrank(adapters, weights, modules, method, params, new_rank)
        elif method.form is Form.DELTA_SVD:
            state = _delta_svd(adapters, weights, modules, method, params, new_rank, layout)
        else:
            state = _factorwise(adapters, weights, modules, method, params)
    config = merged_config(adapters, new_rank)
    config.fan_in_fan_out = peft_fan_in_fan_out(config.fan_in_fan_out, modules, layout)
    return state, config


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


def _entry(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> dict[str, torch.Tensor]:
    # + 0.0 turns -0.0 into 0.0: equal values, and equal bytes whichever path made them.
    return {
        saved_key(module, "lora_A"): (lora_a + 0.0).contiguous(),
        saved_key(module, "lora_B"): (lora_b + 0.0).contiguous(),
    }


def _present(adapters, weights, module: str) -> list[tuple[AdapterTensors, float]]:
    return [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.factors]


def _replay_peft_initialisation(adapters, modules: list[str], new_rank: int) -> None:
    """Put the stream where PEFT's path has it when it draws the first mask (`seeding`)."""
    shapes = []
    for module in modules:
        a, b = next(x.factors[module] for x in adapters if module in x.factors)
        shapes.append((a.shape[1], b.shape[0]))
    seeding.replay_peft_initialisation(shapes, adapters[0].config.init_lora_weights, new_rank)


def _draw_masks(tensors: Sequence[torch.Tensor], params: dict[str, Any]) -> list[torch.Tensor]:
    """DARE's Bernoulli(density) masks, one per tensor, in order, by the seeding policy."""
    return seeding.bernoulli_masks(tensors, params["density"])


def _groups(adapters, weights, modules: list[str]) -> list[list[str]]:
    """Modules that can be computed together: the same inputs present, with the same scalings
    and factor shapes (in module order within each group)."""
    groups: dict[tuple, list[str]] = {}
    for module in modules:
        key = tuple(
            (id(a), a.scaling(module), *_shapes(a, module))
            for a, _ in _present(adapters, weights, module)
        )
        groups.setdefault(key, []).append(module)
    return list(groups.values())


def _stacked(adapter: AdapterTensors, group: list[str], side: int) -> torch.Tensor:
    """One input's factor (0: A, 1: B) for every module of a group, stacked: [M, ...]."""
    return torch.stack([adapter.factors[m][side] for m in group])


def _stacked_inputs(present, group: list[str], side: int) -> torch.Tensor:
    """Every input's factor for every module of a group: [N, M, ...], in one copy."""
    tensors = [a.factors[m][side] for a, _ in present for m in group]
    return torch.stack(tensors).view(len(present), len(group), *tensors[0].shape)


def _pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int):
    """Zero rows of A and columns of B up to `rank` (batched [M, r, in] and [M, out, r])."""
    missing = rank - lora_a.shape[1]
    if missing > 0:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(lora_a.shape[0], missing, lora_a.shape[2])], 1)
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], lora_b.shape[1], missing)], 2)
    return lora_a, lora_b


def _cat(adapters, weights, modules: list[str], new_rank: int) -> dict[str, torch.Tensor]:
    """Stacked factors: A_i scaled by w_i * s_i, zero rows up to the summed rank (as PEFT), for
    the modules of a group at once."""
    state = {}
    for group in _groups(adapters, weights, modules):
        present = _present(adapters, weights, group[0])
        scaled = [_stacked(a, group, 0) * w * a.scaling(group[0]) for a, w in present]
        lora_a = torch.cat(scaled, dim=1)
        lora_b = torch.cat([_stacked(a, group, 1) for a, _ in present], dim=2)
        lora_a, lora_b = _pad_rank(lora_a, lora_b, new_rank)
        for i, module in enumerate(group):
            state.update(_entry(module, lora_a[i], lora_b[i]))
    return state


def _factor_weights(present, module: str) -> tuple[list[float], list[float]]:
    """PEFT's per-input weights for combining A's and B's: sqrt(|w s|), the sign on A's side."""
    weights_a, weights_b = [], []
    for adapter, weight in present:
        scaled = weight * adapter.scaling(module)
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    return weights_a, weights_b


def _factorwise(adapters, weights, modules: list[str], method: Method, params):
    """linear, ties, dare_*, magnitude_prune: the A's and the B's combined separately, each input
    weighted by sqrt(|w s|) (the sign on A's side), exactly as PEFT does, for the modules of a
    group at once (pruning stays per module)."""
    masks: dict[tuple[str, int], list[torch.Tensor]] = {}
    if method.random:  # PEFT's order: module by module, A's then B's, input by input
        for module in modules:
            present = _present(adapters, weights, module)
            for side in (0, 1):
                tensors = [a.factors[module][side] for a, _ in present]
                masks[module, side] = _draw_masks(tensors, params)
    state = {}
    for group in _groups(adapters, weights, modules):
        present = _present(adapters, weights, group[0])
        merged = []
        for side, side_weights in enumerate(_factor_weights(present, group[0])):
            stacked = _stacked_inputs(present, group, side)
            group_masks = None
            if method.random:
                group_masks = torch.stack(
                    [torch.stack([masks[m, side][i] for m in group]) for i in range(len(present))]
                )
            weight = torch.tensor(side_weights).to(stacked.device)
            merged.append(method.combine(stacked, weight, params, group_masks))
        for i, module in enumerate(group):
            state.update(_entry(module, merged[0][i], merged[1][i]))
    return state


def _shapes(adapter: AdapterTensors, module: str) -> tuple:
    a, b = adapter.factors[module]
    return tuple(a.shape), tuple(b.shape)


def _delta_svd(
    adapters, weights, modules: list[str], method: Method, params, new_rank: int, layout: Layout
):
    """The *svd types: the combined delta refactored to rank `new_rank`."""
    low_rank = (
        method.combine is METHODS["svd"].combine
        and params.get("svd_clamp") is None
        and params.get("svd_driver") is None
    )
    if low_rank:
        return _low_rank_svd(adapters, weights, modules, new_rank)
    state = {}
    for module in modules:
        present = _present(adapters, weights, module)
        layer = layout.layers.get(module)
        transposed = layer is not None and layer.fan_in_fan_out
        lora_a, lora_b = _dense_svd(module, present, method, params, new_rank, transposed)
        state.update(_entry(module, lora_a, lora_b))
    return state


def _dense_svd(module: str, present, method: Method, params, new_rank: int, transposed: bool):
    """Pruned deltas are dense by nature; clamping depends on the singular vectors' signs, and a
    cuSOLVER driver is a request for the dense routine: all three take PEFT's dense path.

    PEFT combines the deltas in the layer's own weight layout, (in, out) for a Conv1D layer
    (`transposed`), so DARE's masks are drawn in that layout too, then transposed back."""
    deltas = [(a.factors[module][1] @ a.factors[module][0]) * a.scaling(module) for a, _ in present]
    if transposed:
        deltas = [delta.T for delta in deltas]
    stacked = torch.stack(deltas).unsqueeze(1)  # one "module" of the delta's shape
    masks = torch.stack(_draw_masks(deltas, params)).unsqueeze(1) if method.random else None
    weights = torch.tensor([w for _, w in present]).to(stacked.device)
    delta = method.combine(stacked, weights, params, masks)[0]
    if transposed:
        delta = delta.T
    _check_svd_input(module, delta)
    u, s, vh = torch.linalg.svd(
        delta, full_matrices=params.get("svd_full_matrices", True), driver=params.get("svd_driver")
    )
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    clamp = params.get("svd_clamp")
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def _low_rank_svd(adapters, weights, modules: list[str], new_rank: int):
    """Truncated SVD of sum_i w_i s_i B_i A_i from its factors, never forming the delta:
    B_cat = Q_b R_b and A_cat^T = Q_a R_a, so the delta is Q_b (R_b R_a^T) Q_a^T and the SVD of
    the small R x R core gives it. Batched over the modules of a group."""
    state = {}
    for group in _groups(adapters, weights, modules):
        present = _present(adapters, weights, group[0])
        stacked_b = torch.cat(
            [_stacked(a, group, 1) * (w * a.scaling(group[0])) for a, w in present], dim=2
        )
        stacked_a = torch.cat([_stacked(a, group, 0) for a, _ in present], dim=1)
        _check_svd_input(group[0], stacked_b)
        q_b, r_b = torch.linalg.qr(stacked_b)
        q_a, r_a = torch.linalg.qr(stacked_a.transpose(1, 2))
        u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.transpose(1, 2))
        out_features, in_features = stacked_b.shape[1], stacked_a.shape[2]
        keep = min(new_rank, out_features, in_features)
        lora_b = (q_b @ u_core)[:, :, :keep] * s[:, None, :keep]
        lora_a = (vh_core @ q_a.transpose(1, 2))[:, :keep]
        # The delta's rank may be below svd_rank: the rest is exactly zero.
        lora_a, lora_b = _pad_rank(lora_a, lora_b, keep)
        for i, module in enumerate(group):
            state.update(_entry(module, lora_a[i], lora_b[i]))
    return state


def _lowrank(adapters, weights, modules: list[str], method: Method, params, new_rank: int):
    """Methods PEFT does not have, merged in the inputs' low-rank space, module by module."""
    from raymerge.merge.engines import lowrank

    state = {}
    for module in modules:
        inputs = [
            (a.factors[module][1], a.factors[module][0], w * a.scaling(module))
            for a, w in _present(adapters, weights, module)
        ]
        for b, _, scale in inputs:
            _check_svd_input(module, b * scale)
        lora_b, lora_a = lowrank.merge_factors(method.name, inputs, params, new_rank)
        state.update(_entry(module, lora_a.to(inputs[0][0].dtype), lora_b.to(inputs[0][0].dtype)))
    return state


def _check_svd_input(module: str, matrix: torch.Tensor) -> None:
    """An SVD of NaN or Inf fails obscurely (or not at all): say what happened instead."""
    if not tensors.all_true(torch.isfinite(matrix)):
        raise MergeError(
            f"{module}: the weighted delta is not finite in float32 (are the weights too large?); "
            "nothing was written"
        )
