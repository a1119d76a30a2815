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


def dense_reference(name: str, factors, params: dict, rank: int) -> torch.Tensor:
    """The merged delta by the method's definition, in float64, with every out x in matrix
    formed: factors are (B_i, A_i, scale_i) and dW_i = scale_i B_i A_i. (The random methods
    draw their masks here in the order the engine does, after the caller seeded torch.)"""
    deltas = [scale * b.double() @ a.double() for b, a, scale in factors]
    density = params.get("density")
    if name.startswith("core"):
        u_ref = _svd(torch.cat([b.double() for b, _, _ in factors], dim=1))[0]
        v_ref = _svd(torch.cat([a.double() for _, a, _ in factors], dim=0))[2]
        cores = [u_ref.T @ d @ v_ref.T for d in deltas]
        if name == "core_ta":
            merged = sum(cores)
        elif name == "core_ties":
            merged = _ties(cores, density)
        else:
            merged = _dare(cores, density)
        delta = u_ref @ merged @ v_ref
    elif name.startswith("knots"):
        u, s, vh = _svd(torch.cat(deltas, dim=1))
        keep = int((s > s.max() * 1e-10).sum())
        n = deltas[0].shape[1]
        blocks = [s[:keep, None] * vh[:keep, i * n : (i + 1) * n] for i in range(len(deltas))]
        merged = _ties(blocks, density) if name == "knots_ties" else _dare(blocks, density)
        delta = u[:, :keep] @ merged
    elif name == "tsv":
        us, sigmas, vs = [], [], []
        for d, (b, _, _) in zip(deltas, factors, strict=True):
            u, s, vh = _svd(d)
            kept = max(1, round(params.get("k", 1.0) * b.shape[1]))
            us.append(u[:, :kept])
            sigmas.append(s[:kept])
            vs.append(vh[:kept].T)
        delta = (_polar(torch.cat(us, 1)) * torch.cat(sigmas)) @ _polar(torch.cat(vs, 1)).T
    else:  # iso_c: a flat spectrum, written along the sum's top `rank` directions
        u, s, vh = _svd(sum(deltas))
        nonzero = s > s.max() * len(deltas) * 16 * torch.finfo(torch.float32).eps
        kept = min(rank, int(nonzero.sum()))
        delta = (u[:, :kept] * s[nonzero].mean()) @ vh[:kept]
    return params.get("alpha", 1.0) * delta
