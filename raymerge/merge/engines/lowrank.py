"""Merging methods PEFT does not have, computed exactly in the adapters' own low-rank space.

Every input delta of a module, dW_i = w_i s_i B_i A_i (the merge weight w_i and the LoRA scaling
s_i folded in), lies in a space of rank R = sum r_i: the span of the stacked B's on the left and
of the stacked A's on the right. Each method below is defined on small R x R (or R x in) matrices
in orthonormal bases of that space, never on the out x in delta, so a merge costs O(d R^2); the
merged delta is then written as a LoRA of the requested rank by exact truncation (its SVD, again
from the factors).

- core_ta    Core Space task arithmetic (Panariello et al., NeurIPS 2025): the sum of the cores,
             which is exactly the weighted sum of the deltas.
- core_ties  Core Space TIES: trim each core to `density` of its entries by magnitude, elect signs,
             disjoint mean; cores in the bases of the SVDs of the stacked B's and A's.
- core_dare  Core Space DARE: drop each core entry with probability 1 - density, rescale by
             1 / density, sum (seeded per merge).
- knots_ties KnOTS (Stoica et al., ICLR 2025): one SVD of the deltas side by side, [dW_1 ... dW_T]
             = U S V^T; TIES on each task's block S V_i^T; the merge is U times the result.
- knots_dare_ties  KnOTS-DARE-TIES, as the paper's code runs it: DARE on those blocks, then TIES'
             sign election and disjoint mean (no magnitude trim).
- knots_dare_linear  DARE on those blocks, then their plain sum (what `knots_dare` was).
- tsv        TSV-Merge (Gargiulo et al., CVPR 2025): each task's top singular vectors, stacked and
             decorrelated by orthogonal Procrustes; max(1, round(k * budget)) triplets per task,
             k in (0, 1] (default 1), the budget the task's LoRA rank (`k_of: rank`, default) or
             the paper's int(min(out, in) / T) for T tasks, capped at that rank (`k_of: dims`).
- iso_c      Iso-C (Marczak et al., ICML 2025): the summed delta with its singular values replaced
             by their mean, over the spectrum's non-zero part (`mean_over: nonzero`, default: a
             LoRA sum has rank R at most) or, as the paper's code, over all min(out, in) of them
             (`mean_over: all`); written at svd_rank along the sum's top singular directions.

Every method scales its result by `alpha` (default 1). TIES and DARE follow PEFT's conventions
(the int(density * size) largest magnitudes kept; a zero sign sum elects +; DARE rescales).
Arithmetic is float64 inside (the matrices are small) and the factors come out in float32.
core_ta, core_ties, tsv and the truncation take a batch of modules of equal shapes at once
(factors [M, out, r] and [M, r, in]); knots_* and iso_c decide each module's numerical rank from
its own singular values, and core_dare draws its masks in module order, so they take one module
at a time.

Example:
    >>> import torch
    >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> lora_b, lora_a = merge_factors("core_ta", [(b, a, 1.0), (b, a, 2.0)], {}, rank=2)
    >>> bool(torch.allclose(lora_b.double() @ lora_a.double(), 3 * b @ a, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raymerge.merge import arithmetic, seeding, tensors

Input = tuple[torch.Tensor, torch.Tensor, float]
"""(B, A, scale) of one input for one module (or a batch of modules: [M, out, r], [M, r, in]):
its delta is scale * B @ A (scale = merge weight times LoRA scaling)."""


def merge_factors(
    name: str, inputs: Sequence[Input], params: dict[str, Any], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged (lora_B, lora_A) of rank `rank` for one module (or a batch of modules, for the
    `BATCHED` methods), as PEFT's svd types write them: lora_B = U diag(S), lora_A = V^T of the
    merged delta's truncated SVD."""
    one = inputs[0][0].dim() == 2
    if one and name in BATCHED:  # a batch of one module
        inputs = [(b[None], a[None], scale) for b, a, scale in inputs]
    elif not one and name not in BATCHED:
        raise ValueError(f"{name} merges one module at a time")
    inputs = [(b.double(), a.double(), float(scale)) for b, a, scale in inputs]
    left, right = METHODS[name](inputs, params, rank)
    alpha = float(params.get("alpha", 1.0))
    lora_b, lora_a = truncate(left * alpha, right, rank)
    if one and name in BATCHED:
        lora_b, lora_a = lora_b[0], lora_a[0]
    return lora_b.float(), lora_a.float()


def truncate(left: torch.Tensor, right: torch.Tensor, rank: int):
    """The best rank-`rank` factors of left @ right (out x k times k x in, batched over any
    leading dimensions), from QR of each side and an SVD of the small core; zero-padded when the
    product's rank is lower."""
    q_b, r_b = torch.linalg.qr(left)
    q_a, r_a = torch.linalg.qr(right.mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
    keep = min(rank, s.shape[-1])
    lora_b = (q_b @ u[..., :keep]) * s[..., None, :keep]
    lora_a = vh[..., :keep, :] @ q_a.mT
    missing = rank - keep
    if missing > 0:
        lora_b = torch.cat([lora_b, lora_b.new_zeros(*lora_b.shape[:-1], missing)], -1)
        lora_a = torch.cat(
            [lora_a, lora_a.new_zeros(*lora_a.shape[:-2], missing, lora_a.shape[-1])], -2
        )
    return lora_b, lora_a


def core_bases(inputs: Sequence[Input]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_ref (out x R): the left singular vectors of the stacked B's; V_ref (R x in): the right
    singular vectors of the stacked A's (Core Space Merging's bases, from the raw factors)."""
    stacked_b = torch.cat([b for b, _, _ in inputs], dim=-1)
    stacked_a = torch.cat([a for _, a, _ in inputs], dim=-2)
    u_ref = torch.linalg.svd(stacked_b, full_matrices=False)[0]
    v_ref = torch.linalg.svd(stacked_a, full_matrices=False)[2]
    return u_ref, v_ref


def cores(inputs: Sequence[Input], u_ref, v_ref) -> torch.Tensor:
    """Each input's delta in the core space, M_i = U_ref^T dW_i V_ref^T, stacked [T, ..., R, R]."""
    return torch.stack([scale * (u_ref.mT @ b) @ (a @ v_ref.mT) for b, a, scale in inputs])


def _core_ta(inputs, params, rank):
    u_ref, v_ref = core_bases(inputs)
    return u_ref @ cores(inputs, u_ref, v_ref).sum(dim=0), v_ref


def _core_ties(inputs, params, rank):
    u_ref, v_ref = core_bases(inputs)
    stacked = cores(inputs, u_ref, v_ref)  # [T, M modules, R, R]
    ones = stacked.new_ones(len(inputs))
    return u_ref @ arithmetic.ties(stacked, ones, _ties_params(params)), v_ref


def _core_dare(inputs, params, rank):
    u_ref, v_ref = core_bases(inputs)
    stacked = cores(inputs, u_ref, v_ref).unsqueeze(1)  # [T, 1 module, R, R]
    ones = stacked.new_ones(len(inputs))
    merged = arithmetic.dare_linear(stacked, ones, params, _masks(stacked, params))[0]
    return u_ref @ merged, v_ref


def knots_space(inputs: Sequence[Input]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U (out x k) and each task's block Z_i = S V_i^T = U^T dW_i (k x in) of the SVD of the
    deltas side by side, [dW_1 ... dW_T] = U S [V_1^T ... V_T^T], from the factors: the stacked
    B's (scaled) times a block-diagonal of the A's, whose QR is block-diagonal too."""
    q_b, r_b = torch.linalg.qr(torch.cat([scale * b for b, _, scale in inputs], dim=1))
    q_as, r_as = zip(*(torch.linalg.qr(a.T) for _, a, _ in inputs), strict=True)
    middle = r_b @ torch.block_diag(*(r.T for r in r_as))
    p, s, qh = torch.linalg.svd(middle, full_matrices=False)
    keep = tensors.count(s > s.max() * 1e-10) if s.numel() else 0
    u = q_b @ p[:, :keep]
    blocks, start = [], 0
    for q_a in q_as:
        width = q_a.shape[1]
        blocks.append((s[:keep, None] * qh[:keep, start : start + width]) @ q_a.T)
        start += width
    return u, blocks


def _knots_ties(inputs, params, rank):
    u, blocks = knots_space(inputs)
    stacked = torch.stack(blocks).unsqueeze(1)
    ones = stacked.new_ones(len(inputs))
    return u, arithmetic.ties(stacked, ones, _ties_params(params))[0]


def _knots_dare_ties(inputs, params, rank):
    u, blocks = knots_space(inputs)
    stacked = torch.stack(blocks).unsqueeze(1)
    ones = stacked.new_ones(len(inputs))
    masks = _masks(stacked, params)
    return u, arithmetic.dare_ties(stacked, ones, _ties_params(params), masks)[0]


def _knots_dare_linear(inputs, params, rank):
    u, blocks = knots_space(inputs)
    stacked = torch.stack(blocks).unsqueeze(1)
    ones = stacked.new_ones(len(inputs))
    return u, arithmetic.dare_linear(stacked, ones, params, _masks(stacked, params))[0]


def _tsv(inputs, params, rank):
    """Each task's top singular vectors (in the core space, where its SVD is its delta's), its
    max(1, round(k * budget)) of them (`tsv_budget`), stacked, made orthonormal by the nearest
    orthonormal matrix (orthogonal Procrustes: U_hat = P Q^T for U_hat's SVD P S Q^T)."""
    u_ref, v_ref = core_bases(inputs)
    us, sigmas, vs = [], [], []
    fraction = float(params.get("k", 1.0))
    shape = (u_ref.shape[-2], v_ref.shape[-1])
    for core, (b, _, _) in zip(cores(inputs, u_ref, v_ref), inputs, strict=True):
        u, s, vh = torch.linalg.svd(core)
        budget = tsv_budget(params.get("k_of", "rank"), b.shape[-1], shape, len(inputs))
        kept = max(1, round(fraction * budget))
        us.append(u[..., :kept])
        sigmas.append(s[..., :kept])
        vs.append(vh[..., :kept, :].mT)
    u_orth = polar(torch.cat(us, dim=-1))
    v_orth = polar(torch.cat(vs, dim=-1))
    merged = (u_orth * torch.cat(sigmas, dim=-1)[..., None, :]) @ v_orth.mT
    return u_ref @ merged, v_ref


def tsv_budget(k_of: str, rank: int, shape: tuple[int, int], tasks: int) -> int:
    """The triplets TSV may keep of one task: its LoRA rank (`rank`), or TSV-Merge's share of
    the module's dimensions, int(min(out, in) * (1 / T)) as its code computes it, capped at the
    rank (past it the singular values are 0 and the vectors arbitrary), at least 1."""
    if k_of == "rank":
        return rank
    return max(1, min(rank, int(min(shape) * (1 / tasks))))


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (P Q^T from the SVD P S Q^T)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _iso_c(inputs, params, rank):
    """The sum of the cores, every non-zero singular value replaced by their mean (or, with
    `mean_over: all`, by their sum over min(out, in): the mean of the delta's whole spectrum,
    zeros included). A flat spectrum has no best rank-k part: the written rank keeps the sum's
    own top directions."""
    u_ref, v_ref = core_bases(inputs)
    u, s, vh = torch.linalg.svd(cores(inputs, u_ref, v_ref).sum(dim=0))
    nonzero = tensors.count(s > s.max() * max(s.shape[0], 1) * torch.finfo(torch.float32).eps)
    # Singular values come sorted: the non-zero ones are the first `nonzero`.
    flat = s[:nonzero].mean() if nonzero else s.new_zeros(())
    if params.get("mean_over") == "all":  # the zeros past the rank of the sum count too
        flat = flat * nonzero / min(u_ref.shape[0], v_ref.shape[1])
    kept = min(rank, nonzero)
    merged = (u[:, :kept] * flat) @ vh[:kept]
    return u_ref @ merged, v_ref


def _ties_params(params: dict[str, Any]) -> dict[str, Any]:
    """Signs elected by total, always: a block's or core's basis is an SVD's, whose signs are
    arbitrary, and only the total's election commutes with flipping them (counting signs ties
    at 0 too often, DARE's dropped entries counting for neither)."""
    return {"density": params["density"], "majority_sign_method": "total"}


def _masks(stacked: torch.Tensor, params: dict[str, Any]) -> torch.Tensor | None:
    """DARE's Bernoulli(density) masks for `stacked` [T inputs, M modules, ...], by the seeding
    policy (the caller seeds the stream), drawn module by module, input by input: the order of
    one module at a time, whatever the batch."""
    density = params["density"]
    if density >= 1:
        return None
    inputs, modules, *shape = stacked.shape
    order = stacked.new_empty((modules, inputs, *shape))
    return seeding.bernoulli_mask(order, density).transpose(0, 1)


BATCHED = frozenset({"core_ta", "core_ties", "tsv"})
"""The methods that take a batch of modules: not knots_* and iso_c (they read each module's
numerical rank), nor core_dare (its draws follow module order, which a chunk does not)."""

METHODS = {
    "core_ta": _core_ta,
    "core_ties": _core_ties,
    "core_dare": _core_dare,
    "knots_ties": _knots_ties,
    "knots_dare_ties": _knots_dare_ties,
    "knots_dare_linear": _knots_dare_linear,
    "tsv": _tsv,
    "iso_c": _iso_c,
}
"""Each method: (inputs, params, rank) -> (left, right), the merged delta = left @ right."""
