"""The Pareto front of two metrics: the merges no other merge beats on both.

Example:
    >>> pareto_front([(1.0, 3.0), (2.0, 1.0), (3.0, 3.0)])
    [0, 1]
"""

from __future__ import annotations

import math


def pareto_front(points: list[tuple[float, float]], directions=("minimize", "minimize")):
    """Indices of the points no other point beats on both coordinates."""
    signs = [1 if d == "minimize" else -1 for d in directions]
    keyed = [(p[0] * signs[0], p[1] * signs[1]) for p in points]
    front, best_y = [], math.inf
    for i in sorted(range(len(keyed)), key=lambda i: keyed[i]):
        if keyed[i][1] < best_y:
            front.append(i)
            best_y = keyed[i][1]
    return front
