"""keep top-k: only the best k merges by the objective keep their adapter files; every merge
keeps its merge.json (its recipe, metrics and the digests its files would have), so any one can
be rebuilt (`raymerge materialize`).

While the sweep runs, each task carries the current k-th best objective: a worker writes a
merge's files only if it beats it, and the driver removes the files of a merge pushed out of the
top k as soon as that happens. At the end, one pass over the manifest settles it: exactly the
best k keep their files.

Example:
    >>> from raymerge.score.objective import Objective
    >>> top = KeepTopK(2, Objective.parse("qa.accuracy"))
    >>> [top.offer({"merge_id": m, "objective": v, "kept": True})
    ...  for m, v in (("a", 0.5), ("b", 0.7), ("c", 0.6))]
    [[], [], ['a']]
    >>> top.threshold()
    0.6
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Any

from raymerge.score.objective import Objective


class KeepTopK:
    """The k best merges offered so far (by objective), and which fell out."""

    def __init__(self, k: int, objective: Objective):
        self.k = k
        self.objective = objective
        self._heap: list[tuple[float, str]] = []  # (-sort key, merge id): the worst on top

    def threshold(self) -> float | None:
        """The objective a new merge must beat to keep its files (None: fewer than k kept)."""
        if len(self._heap) < self.k:
            return None
        key = -self._heap[0][0]
        return key if self.objective.direction == "minimize" else -key

    def offer(self, line: dict[str, Any]) -> list[str]:
        """A done merge whose files were kept; returns the merge ids pushed out of the top k."""
        value = line.get("objective")
        if not line.get("kept", True) or value is None or math.isnan(value):
            return []
        item = (-self.objective.sort_key(value), _reverse(line["merge_id"]))
        heapq.heappush(self._heap, item)  # ties: the smaller id stays, as in final_top
        out = []
        while len(self._heap) > self.k:
            out.append(_reverse(heapq.heappop(self._heap)[1]))
        return out


def keeps_files(
    objective: Objective, metrics: dict[str, Any] | None, threshold: float | None
) -> bool:
    """Whether a merge with these metrics keeps its files: it beats the k-th best so far (a
    merge without a threshold or without metrics always does).

    >>> keeps_files(Objective.parse("qa.accuracy"), {"qa": {"accuracy": 0.7}}, 0.6)
    True
    >>> keeps_files(Objective.parse("qa.accuracy"), {"qa": {"accuracy": 0.5}}, 0.6)
    False
    """
    if threshold is None or metrics is None:
        return True
    return objective.better(objective.value(metrics), threshold)


def final_top(lines: Iterable[dict[str, Any]], k: int, objective: Objective) -> set[str]:
    """The ids of the best k scored, done merges (ties broken by merge id)."""
    best: list[tuple[float, str]] = []
    for line in lines:
        if line.get("status") != "done" or not line.get("metrics"):
            continue
        value = line.get("objective")
        if value is None:
            value = objective.value(line["metrics"])
        if math.isnan(value):
            continue
        item = (-objective.sort_key(value), _reverse(line["merge_id"]))
        if len(best) < k:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    return {_reverse(merge_id) for _, merge_id in best}


def _reverse(merge_id: str) -> str:
    """Tie-break: the smaller id wins (the heap keeps the larger of equal keys)."""
    return "".join(chr(255 - ord(c)) for c in merge_id)
