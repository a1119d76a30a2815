"""The fast engine's types that refactor a merged delta to a rank: PEFT's *svd types (low-rank
from the factors, or PEFT's dense path) and the methods PEFT lacks (`lowrank`), each written
into the merge's output with its inputs' finiteness read at the output's one check.
"""

from __future__ import annotations

import torch

from raymerge.merge import seeding
from raymerge.merge.engines.chunks import chunks, groups, inputs_at, keys, pad_rank, stacked_factor
from raymerge.merge.layout import Layout
from raymerge.merge.output import MergedOutput
from raymerge.merge.registry import METHODS, Method


def delta_svd(
    adapters, weights, modules, method: Method, params, new_rank: int, layout: Layout, output
) -> None:
    """The *svd types: the combined delta refactored to rank `new_rank`."""
    low_rank = (
        method.combine is METHODS["svd"].combine
        and params.get("svd_clamp") is None
        and params.get("svd_driver") is None
    )
    if low_rank:
        _low_rank_svd(adapters, weights, modules, new_rank, output)
        return
    for module in modules:
        present = inputs_at(adapters, weights, module)
        layer = layout.layers.get(module)
        transposed = layer is not None and layer.fan_in_fan_out
        lora_a, lora_b = _dense_svd(module, present, method, params, new_rank, transposed, output)
        output.put(keys([module], "lora_A"), lora_a[None])
        output.put(keys([module], "lora_B"), lora_b[None])


def _dense_svd(module: str, present, method: Method, params, new_rank, transposed, output):
    """Pruned deltas are dense by nature; clamping depends on the singular vectors' signs, and a
    cuSOLVER driver is a request for the dense routine: all three take PEFT's dense path.

    PEFT combines the deltas in the layer's own weight layout, (in, out) for a Conv1D layer
    (`transposed`), so DARE's masks are drawn in that layout too, then transposed back."""
    deltas = [(a.factors[module][1] @ a.factors[module][0]) * a.scaling(module) for a, _ in present]
    if transposed:
        deltas = [delta.T for delta in deltas]
    stacked = torch.stack(deltas).unsqueeze(1)  # one "module" of the delta's shape
    masks = None
    if method.random:
        masks = torch.stack(seeding.bernoulli_masks(deltas, params["density"])).unsqueeze(1)
    weights = torch.tensor([w for _, w in present]).to(stacked.device)
    delta = method.combine(stacked, weights, params, masks)[0]
    if transposed:
        delta = delta.T
    _require_finite(output, module, delta)
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


def _low_rank_svd(adapters, weights, modules: list[str], new_rank: int, output) -> None:
    """Truncated SVD of sum_i w_i s_i B_i A_i from its factors, never forming the delta:
    B_cat = Q_b R_b and A_cat^T = Q_a R_a, so the delta is Q_b (R_b R_a^T) Q_a^T and the SVD of
    the small R x R core gives it. Batched over the modules of a chunk."""
    for group in groups(adapters, weights, modules):
        present = inputs_at(adapters, weights, group[0])
        for chunk in chunks(group, present, output):
            stacked_b = torch.cat(
                [stacked_factor(a, chunk, 1) * (w * a.scaling(chunk[0])) for a, w in present], dim=2
            )
            stacked_a = torch.cat([stacked_factor(a, chunk, 0) for a, _ in present], dim=1)
            _require_finite(output, chunk[0], stacked_b)
            q_b, r_b = torch.linalg.qr(stacked_b)
            q_a, r_a = torch.linalg.qr(stacked_a.transpose(1, 2))
            u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.transpose(1, 2))
            out_features, in_features = stacked_b.shape[1], stacked_a.shape[2]
            keep = min(new_rank, out_features, in_features)
            lora_b = (q_b @ u_core)[:, :, :keep] * s[:, None, :keep]
            lora_a = (vh_core @ q_a.transpose(1, 2))[:, :keep]
            # The delta's rank may be below svd_rank: the rest is exactly zero.
            lora_a, lora_b = pad_rank(lora_a, lora_b, keep)
            output.put(keys(chunk, "lora_A"), lora_a)
            output.put(keys(chunk, "lora_B"), lora_b)


def lowrank_types(adapters, weights, modules, method: Method, params, new_rank: int, output):
    """Methods PEFT does not have, merged in the inputs' low-rank space: a chunk of modules of
    equal shapes at once for those that take a batch (`lowrank.BATCHED`), else module by module
    in module order (the order DARE's draws follow)."""
    from raymerge.merge.engines import lowrank

    if method.name not in lowrank.BATCHED:
        for module in modules:
            present = inputs_at(adapters, weights, module)
            inputs = [(a.factors[module][1], a.factors[module][0], w * a.scaling(module))
                      for a, w in present]  # fmt: skip
            _lowrank_run(lowrank, method, inputs, params, new_rank, [module], output)
        return
    for group in groups(adapters, weights, modules):
        present = inputs_at(adapters, weights, group[0])
        for run in chunks(group, present, output):
            inputs = [
                (stacked_factor(a, run, 1), stacked_factor(a, run, 0), w * a.scaling(run[0]))
                for a, w in present
            ]
            _lowrank_run(lowrank, method, inputs, params, new_rank, run, output)


def _lowrank_run(lowrank, method: Method, inputs, params, new_rank: int, run, output) -> None:
    """One module's merge (factors 2-d), or a chunk's (batched [M, ...])."""
    for b, _, scale in inputs:
        _require_finite(output, run[0], b * scale)
    lora_b, lora_a = lowrank.merge_factors(method.name, inputs, params, new_rank)
    dtype = inputs[0][0].dtype
    if lora_a.dim() == 2:
        lora_b, lora_a = lora_b[None], lora_a[None]
    output.put(keys(run, "lora_A"), lora_a.to(dtype))
    output.put(keys(run, "lora_B"), lora_b.to(dtype))


def _require_finite(output: MergedOutput, module: str, matrix: torch.Tensor) -> None:
    """An SVD of NaN or Inf fails obscurely (or not at all): the merge says what happened instead
    (read with the output's own check, not one read per module)."""
    output.require(
        torch.isfinite(matrix).all(),
        f"{module}: the weighted delta is not finite in float32 (are the weights too large?); "
        "nothing was written",
    )
