"""The merge identity: a merge's id, its random seed, and equality as the id sees it.

This is the one place that decides when two merges are the same merge; the plan's
de-duplication and the output layout both follow from it.

Example:
    >>> located = located_adapters(["x", "y"], {"x": " x/ ", "y": "y"})
    >>> located
    [('x', 'x'), ('y', 'y')]
    >>> mid = merge_id(located, [0.5, 0.5], "cat", {}, seed=0)
    >>> len(mid)
    16
    >>> 0 <= merge_seed(mid) < 2**63
    True
    >>> canonical_key([0.0]) == canonical_key([-0.0])
    False
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any


def merge_id(
    adapters: list[tuple[str, str]],
    weights: list[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
    output_dtype: str = "float32",
) -> str:
    """The stable identity of a merge: a 16-hex-digit hash of its canonical JSON.

    It covers everything that decides the merged adapter's bytes: adapters, weights, type,
    parameters, seed and output dtype.

    `adapters` are (name, location as written in the spec) pairs, so ids survive moving the
    spec's folder or resubmitting it from another machine.
    """
    canonical = json.dumps(
        {
            "adapters": [list(pair) for pair in adapters],
            "weights": [float(w) for w in weights],
            "combination_type": combination_type,
            "params": params,
            "seed": seed,
            "output_dtype": output_dtype,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def merge_seed(merge_id_: str) -> int:
    """A merge's random seed: a function of its id (which covers the sweep seed), in [0, 2**63)."""
    digest = hashlib.sha256(f"raymerge-seed:{merge_id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def located_adapters(names: Iterable[str], locations: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (name, location as written in the spec) pairs that `merge_id` takes: surrounding
    blanks and trailing slashes do not make another merge."""
    return [(name, locations[name].strip().rstrip("/")) for name in names]


def canonical_key(value: Any) -> str:
    """Equality as the merge id sees it (-0.0 and 0.0 differ there, so they differ here)."""
    return json.dumps(value, sort_keys=True)
