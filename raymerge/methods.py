"""The combination types raymerge knows, keyed by PEFT's names, and which parameters each takes.

Adding a type is one entry here (and its implementation in each engine).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """What the planner needs to know about one combination type."""

    equal_rank: bool
    """All adapters must share one rank (the merged factors are weighted sums of theirs)."""
    prunes: bool
    """Takes `density` (required, in (0, 1])."""
    signs: bool
    """Takes `majority_sign_method` (TIES sign election)."""
    svd: bool
    """Takes the `svd_*` parameters (the merged delta is refactored by SVD)."""

    def defaults(self) -> dict[str, object]:
        """Parameter defaults, PEFT's, so that an omitted default and an explicit one plan alike."""
        out: dict[str, object] = {}
        if self.prunes:
            out["density"] = None
        if self.signs:
            out["majority_sign_method"] = "total"
        if self.svd:
            out.update(svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None)
        return out


COMBINATION_TYPES: dict[str, MethodInfo] = {
    "linear": MethodInfo(equal_rank=True, prunes=False, signs=False, svd=False),
    "cat": MethodInfo(equal_rank=False, prunes=False, signs=False, svd=False),
    "svd": MethodInfo(equal_rank=False, prunes=False, signs=False, svd=True),
    "ties": MethodInfo(equal_rank=True, prunes=True, signs=True, svd=False),
    "ties_svd": MethodInfo(equal_rank=False, prunes=True, signs=True, svd=True),
    "dare_linear": MethodInfo(equal_rank=True, prunes=True, signs=False, svd=False),
    "dare_ties": MethodInfo(equal_rank=True, prunes=True, signs=True, svd=False),
    "dare_linear_svd": MethodInfo(equal_rank=False, prunes=True, signs=False, svd=True),
    "dare_ties_svd": MethodInfo(equal_rank=False, prunes=True, signs=True, svd=True),
    "magnitude_prune": MethodInfo(equal_rank=True, prunes=True, signs=False, svd=False),
    "magnitude_prune_svd": MethodInfo(equal_rank=False, prunes=True, signs=False, svd=True),
}

METHOD_PARAMS = (
    "svd_rank",
    "svd_clamp",
    "svd_full_matrices",
    "svd_driver",
    "density",
    "majority_sign_method",
)
"""Every parameter a method entry may set besides `combination_type` (PEFT's names)."""


def applies(param: str, info: MethodInfo) -> bool:
    """Whether `param` means anything for a combination type."""
    if param == "density":
        return info.prunes
    if param == "majority_sign_method":
        return info.signs
    return param.startswith("svd_") and info.svd
