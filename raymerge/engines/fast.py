"""The fast engine: every combination type straight from the adapters' tensors.

It performs PEFT's `add_weighted_adapter` arithmetic (the same merge_utils functions, called in
the same order, so DARE draws the same masks from the same seed) without injecting a PEFT adapter
into the model, saving it and deleting it for every merge. And `svd` never forms the dense d x d
delta: sum_i w_i s_i B_i A_i has rank at most R = sum_i r_i, so its truncated SVD comes from QR
factorisations of the stacked factors and an R x R SVD, in O(d R^2) instead of O(d^3).

Pure functions: tensors and configs in, tensors and a config out. No Ray, no storage.

Example:
    >>> state, config = merge([math, code], [0.5, 0.5], "svd", {"svd_rank": 8, ...}, seed=0,
    ...                       module_order=[...])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import merge_utils
from peft.utils.other import get_pattern_key

ENGINE = "fast"
PREFIX = "base_model.model."

_COMBINE = {
    "linear": merge_utils.task_arithmetic,
    "svd": merge_utils.task_arithmetic,
    "ties": merge_utils.ties,
    "ties_svd": merge_utils.ties,
    "dare_linear": merge_utils.dare_linear,
    "dare_linear_svd": merge_utils.dare_linear,
    "dare_ties": merge_utils.dare_ties,
    "dare_ties_svd": merge_utils.dare_ties,
    "magnitude_prune": merge_utils.magnitude_prune,
    "magnitude_prune_svd": merge_utils.magnitude_prune,
}
"""How each type combines the inputs' tensors: PEFT's own functions, keyed by PEFT's names."""


@dataclass(frozen=True)
class AdapterTensors:
    """One input adapter, ready to merge: its config and, per module, (A, B) in float32."""

    config: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    embedding: frozenset[str] = frozenset()
    """Modules whose factors are embedding LoRAs (lora_embedding_A/B)."""

    @property
    def rank(self) -> int:
        """The largest rank, by which PEFT sizes merged factors."""
        return max([self.config.r, *(self.config.rank_pattern or {}).values()])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    def scaling(self, module: str) -> float:
        """The module's LoRA scaling as PEFT computes it (rank/alpha patterns, rsLoRA)."""
        config = self.config
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern, module), config.lora_alpha
        )
        return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def adapter_tensors(
    config: LoraConfig, state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> AdapterTensors:
    """Group a saved adapter's tensors by module, as float32 on `device`."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            suffix = f".{part}.weight" if part in ("lora_A", "lora_B") else f".{part}"
            if key.endswith(suffix):
                module = key.removeprefix(PREFIX)[: -len(suffix)]
                parts.setdefault(module, {})[part] = tensor.to(device=device, dtype=torch.float32)
    factors, embedding = {}, set()
    for module, found in parts.items():
        if "lora_A" in found:
            factors[module] = (found["lora_A"], found["lora_B"])
        else:
            factors[module] = (found["lora_embedding_A"], found["lora_embedding_B"])
            embedding.add(module)
    return AdapterTensors(config, factors, frozenset(embedding))


def unsupported(adapters: Sequence[AdapterTensors], combination_type: str) -> str | None:
    """Why the fast engine cannot merge these adapters (the worker then uses PEFT's path)."""
    init = adapters[0].config.init_lora_weights
    if combination_type.startswith("dare") and init not in (True, False, "gaussian"):
        return f"DARE masks after init_lora_weights={init!r} (it could not draw PEFT's masks)"
    for adapter in adapters:
        if adapter.config.fan_in_fan_out:
            return "fan_in_fan_out (Conv1D) layers"
        if adapter.embedding:
            return "embedding targets (PEFT also writes the base embedding beside them)"
        if any(a.dim() != 2 for a, _ in adapter.factors.values()):
            return "convolution targets"
    kinds = {type(adapter.config.target_modules) for adapter in adapters}
    if len(kinds) > 1:
        return "target_modules mixing lists and regular expressions"
    return None


def merge(
    adapters: Sequence[AdapterTensors],
    weights: Sequence[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
    module_order: Sequence[str],
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The merged adapter's tensors (as PEFT saves them, float32) and its config.

    `module_order` is the base model's `named_modules()` order, in which PEFT walks the modules:
    the random types must draw their masks in that order to match it.
    """
    if combination_type.startswith("dare"):  # the only types that draw random numbers
        torch.manual_seed(seed)
    new_rank = _merged_rank(adapters, combination_type, params)
    position = {name: i for i, name in enumerate(module_order)}
    modules = sorted(
        {m for adapter in adapters for m in adapter.factors},
        key=lambda m: (position.get(m, len(position)), m),
    )
    if combination_type.startswith("dare"):
        _replay_peft_initialisation(adapters, modules, new_rank)
    state = {}
    if combination_type == "linear":
        state = _linear_batched(adapters, weights, modules)
        modules = []
    for module in modules:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.factors]
        if combination_type == "cat":
            lora_a, lora_b = _cat(module, present, new_rank)
        elif combination_type.endswith("svd"):
            lora_a, lora_b = _svd(module, present, combination_type, params, new_rank)
        else:
            lora_a, lora_b = _factorwise(module, present, combination_type, params)
        # + 0.0 turns -0.0 into 0.0: equal values, and equal bytes whichever path made them.
        state[f"{PREFIX}{module}.lora_A.weight"] = (lora_a + 0.0).contiguous()
        state[f"{PREFIX}{module}.lora_B.weight"] = (lora_b + 0.0).contiguous()
    return state, merged_config(adapters, new_rank)


def config_json(config: LoraConfig) -> bytes:
    """adapter_config.json's bytes, exactly as PeftConfig.save_pretrained writes them."""
    output = config.to_dict()
    for key, value in output.items():
        if isinstance(value, set):
            output[key] = list(value)
    return json.dumps(output, indent=2, sort_keys=True).encode()


def merged_config(adapters: Sequence[AdapterTensors], new_rank: int) -> LoraConfig:
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


def _replay_peft_initialisation(adapters, modules: list[str], new_rank: int) -> None:
    """Consume the CPU random stream as PEFT's path does before it draws DARE masks.

    add_weighted_adapter first injects a new adapter into every target module: two nn.Linear
    layers, each initialised by kaiming_uniform_, then PEFT's own init of A (init_lora_weights
    of the first input). Drawing the same numbers, in module order, puts the generator where
    PEFT's is when it draws the masks, so both paths draw the same masks from the same seed.
    """
    init = adapters[0].config.init_lora_weights
    for module in modules:
        a, b = next(x.factors[module] for x in adapters if module in x.factors)
        in_features, out_features = a.shape[1], b.shape[0]
        torch.empty(new_rank, in_features).uniform_()  # nn.Linear(in, r).reset_parameters()
        torch.empty(out_features, new_rank).uniform_()  # nn.Linear(r, out).reset_parameters()
        if init is True:
            torch.empty(new_rank, in_features).uniform_()  # kaiming_uniform_(lora_A)
        elif init == "gaussian":
            torch.empty(new_rank, in_features).normal_()


def _merged_rank(adapters, combination_type: str, params: dict[str, Any]) -> int:
    ranks = [a.rank for a in adapters]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type.endswith("svd"):
        return params.get("svd_rank") or max(ranks)
    return ranks[0]


def _cat(module: str, present, new_rank: int):
    """Stacked factors: A_i scaled by w_i * s_i, zero rows up to the summed rank (as PEFT)."""
    a_parts = [a.factors[module][0] * w * a.scaling(module) for a, w in present]
    b_parts = [a.factors[module][1] for a, _ in present]
    lora_a = torch.cat(a_parts, dim=0)
    lora_b = torch.cat(b_parts, dim=1)
    if lora_a.shape[0] < new_rank:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(new_rank - lora_a.shape[0], lora_a.shape[1])])
        lora_b = torch.cat(
            [lora_b, lora_b.new_zeros(lora_b.shape[0], new_rank - lora_b.shape[1])], 1
        )
    return lora_a, lora_b


def _factorwise(module: str, present, combination_type: str, params: dict[str, Any]):
    """linear, ties, dare_*, magnitude_prune: combine the A's and the B's separately, each input
    weighted by sqrt(|w s|) (the sign on A's side), exactly as PEFT does."""
    weights_a, weights_b = _factor_weights(present, module)
    tensors_a = [adapter.factors[module][0] for adapter, _ in present]
    tensors_b = [adapter.factors[module][1] for adapter, _ in present]
    device = tensors_a[0].device
    combined = []
    for tensors, weights in ((tensors_a, weights_a), (tensors_b, weights_b)):
        combined.append(
            _combine(combination_type, tensors, torch.tensor(weights).to(device), params)
        )
    return combined[0].to(tensors_a[0].dtype), combined[1].to(tensors_b[0].dtype)


def _linear_batched(adapters, weights, modules: list[str]) -> dict[str, torch.Tensor]:
    """`linear` for many modules at once: modules with the same inputs, shapes and scalings are
    stacked and summed in one operation (PEFT's task_arithmetic, per element the same sums)."""
    groups: dict[tuple, list[str]] = {}
    for module in modules:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.factors]
        key = tuple(
            (
                id(a),
                w,
                a.scaling(module),
                tuple(a.factors[module][0].shape),
                tuple(a.factors[module][1].shape),
            )
            for a, w in present
        )
        groups.setdefault(key, []).append(module)
    state = {}
    for group in groups.values():
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if group[0] in a.factors]
        weights_a, weights_b = _factor_weights(present, group[0])
        for side, side_weights in ((0, weights_a), (1, weights_b)):
            stacked = torch.stack(
                [torch.stack([a.factors[m][side] for m in group]) for a, _ in present]
            )
            w = torch.tensor(side_weights).to(stacked.device).view(-1, 1, 1, 1)
            merged = (stacked * w).sum(dim=0)
            part = "lora_A" if side == 0 else "lora_B"
            for i, module in enumerate(group):
                state[f"{PREFIX}{module}.{part}.weight"] = merged[i] + 0.0
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


def _combine(combination_type: str, tensors, weights: torch.Tensor, params: dict[str, Any]):
    function = _COMBINE[combination_type]
    kwargs = {}
    if "density" in params:
        kwargs["density"] = params["density"]
    if combination_type in ("ties", "ties_svd", "dare_ties", "dare_ties_svd"):
        kwargs["majority_sign_method"] = params.get("majority_sign_method", "total")
    return function(tensors, weights, **kwargs)


def _svd(module: str, present, combination_type: str, params: dict[str, Any], new_rank: int):
    """The *svd types: the combined delta refactored to rank `new_rank`."""
    clamp, driver = params.get("svd_clamp"), params.get("svd_driver")
    if combination_type == "svd" and clamp is None and driver is None:
        return _low_rank_svd(module, present, new_rank)
    # Pruned deltas are dense by nature; clamping depends on the singular vectors' signs, and a
    # cuSOLVER driver is a request for the dense routine: all three take PEFT's dense path.
    deltas = [(a.factors[module][1] @ a.factors[module][0]) * a.scaling(module) for a, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = _combine(combination_type, deltas, weights, params)
    u, s, vh = torch.linalg.svd(
        delta, full_matrices=params.get("svd_full_matrices", True), driver=driver
    )
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def _low_rank_svd(module: str, present, new_rank: int):
    """Truncated SVD of sum_i w_i s_i B_i A_i from its factors: B_cat = Q_b R_b and A_cat^T =
    Q_a R_a, so the delta is Q_b (R_b R_a^T) Q_a^T and the SVD of the small core gives it."""
    stacked_b = torch.cat([a.factors[module][1] * (w * a.scaling(module)) for a, w in present], 1)
    stacked_a = torch.cat([a.factors[module][0] for a, _ in present], 0)
    q_b, r_b = torch.linalg.qr(stacked_b)
    q_a, r_a = torch.linalg.qr(stacked_a.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    out_features, in_features = stacked_b.shape[0], stacked_a.shape[1]
    keep = min(new_rank, out_features, in_features)
    lora_b = (q_b @ u_core)[:, :keep] * s[:keep]
    lora_a = (vh_core @ q_a.T)[:keep]
    if lora_a.shape[0] < keep:  # the delta's rank is below svd_rank: the rest is exactly zero
        lora_a = torch.cat([lora_a, lora_a.new_zeros(keep - lora_a.shape[0], in_features)])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(out_features, keep - lora_b.shape[1])], 1)
    return lora_a, lora_b
