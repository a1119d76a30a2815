"""The merging methods PEFT lacks, by their papers' definitions on dense deltas: every out x in
delta is formed and every SVD is a full one. Independent of the `lowrank` engine (which never
forms a delta), it is the yardstick for that module's exactness (the tests) and its speed
(`raymerge bench methods`)."""

from __future__ import annotations

import torch
from peft.utils import merge_utils


def _svd(matrix):
    return torch.linalg.svd(matrix, full_matrices=False)


def _polar(matrix):
    u, _, vh = _svd(matrix)
    return u @ vh


def _ties(tensors, density):
    with torch.no_grad():
        return merge_utils.ties(tensors, tensors[0].new_ones(len(tensors)),
                                density, "total")  # fmt: skip


def _dare(tensors, density):
    return merge_utils.dare_linear(tensors, tensors[0].new_ones(len(tensors)),
                                   density)  # fmt: skip


def _dare_ties(tensors, density):
    return merge_utils.dare_ties(tensors, tensors[0].new_ones(len(tensors)),
                                 density, "total")  # fmt: skip


def dense_reference(name: str, factors, params: dict, rank: int) -> torch.Tensor:
    """The merged delta by the method's definition, in float64, with every out x in matrix
    formed: factors are (B_i, A_i, scale_i) and dW_i = scale_i B_i A_i. (The random methods
    draw their masks here in the order the engine does, after the caller seeded torch.)"""
    deltas = [scale * b.double() @ a.double() for b, a, scale in factors]
    if name.startswith("core"):
        delta = _core(name, factors, deltas, params.get("density"))
    elif name.startswith("knots"):
        delta = _knots(name, deltas, params)
    elif name == "tsv":
        delta = _tsv(factors, deltas, params)
    else:  # iso_c: a flat spectrum, written along the sum's top `rank` directions
        u, s, vh = _svd(sum(deltas))
        nonzero = s > s.max() * len(deltas) * 16 * torch.finfo(torch.float32).eps
        kept = min(rank, int(nonzero.sum()))
        # The paper's code: the mean of all min(out, in) singular values; raymerge's default:
        # of the non-zero ones.
        flat = s.mean() if params.get("mean_over") == "all" else s[nonzero].mean()
        delta = (u[:, :kept] * flat) @ vh[:kept]
    return params.get("alpha", 1.0) * delta


def _core(name, factors, deltas, density):
    u_ref = _svd(torch.cat([b.double() for b, _, _ in factors], dim=1))[0]
    v_ref = _svd(torch.cat([a.double() for _, a, _ in factors], dim=0))[2]
    cores = [u_ref.T @ d @ v_ref.T for d in deltas]
    if name == "core_ta":
        merged = sum(cores)
    elif name == "core_ties":
        merged = _ties(cores, density)
    else:
        merged = _dare(cores, density)
    return u_ref @ merged @ v_ref


def _knots(name, deltas, params):
    """KnOTS: one SVD of the deltas side by side; the method on the blocks S V_i^T."""
    u, s, vh = _svd(torch.cat(deltas, dim=1))
    keep = int((s > s.max() * 1e-10).sum())
    n = deltas[0].shape[1]
    blocks = [s[:keep, None] * vh[:keep, i * n : (i + 1) * n] for i in range(len(deltas))]
    density = params.get("density")
    if name == "knots_ties":
        merged = _ties(blocks, density)
    elif name == "knots_dare_linear":
        merged = _dare(blocks, density)
    else:  # knots_dare_ties: DARE, then TIES' election and disjoint mean
        merged = _dare_ties(blocks, density)
    return u[:, :keep] @ merged


def _tsv(factors, deltas, params):
    """TSV-Merge: per task, k of its budget of top singular triplets (the budget its LoRA rank,
    or the paper's int(min(out, in) / T), not past the rank), each side made orthonormal."""
    us, sigmas, vs = [], [], []
    share = int(min(deltas[0].shape) * (1 / len(deltas)))  # as TSV-Merge's code computes it
    for d, (b, _, _) in zip(deltas, factors, strict=True):
        u, s, vh = _svd(d)
        budget = b.shape[1] if params.get("k_of", "rank") == "rank" else min(b.shape[1], share)
        kept = max(1, round(params.get("k", 1.0) * max(1, budget)))
        us.append(u[:, :kept])
        sigmas.append(s[:kept])
        vs.append(vh[:kept].T)
    return (_polar(torch.cat(us, 1)) * torch.cat(sigmas)) @ _polar(torch.cat(vs, 1)).T
