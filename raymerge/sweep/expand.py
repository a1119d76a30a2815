"""Lazy expansion of a sweep spec into candidate merges, group by group.

The plan is never materialised: candidates are generated group by group, and a merge that an
earlier group (or an earlier entry of its own group) already stands for is dropped by testing the
definitions, not by remembering ids, so memory stays flat however large the sweep.

Example:
    >>> from raymerge.sweep.spec import parse_spec
    >>> spec = parse_spec({"base_model": "b", "adapters": {"x": "x", "y": "y", "z": "z"},
    ...     "output": "o", "combinations": [
    ...         {"choose": 2, "weights": [[0.5, 0.5]], "methods": [{"combination_type": "cat"}]},
    ...         {"adapters": ["x", "y"], "weights": [[0.5, 0.5], [1, 1]],
    ...          "methods": [{"combination_type": "cat"}]}]})
    >>> [(c.adapters, c.weights) for c in candidates(spec)]
    [(('x', 'y'), (0.5, 0.5)), (('x', 'z'), (0.5, 0.5)), (('y', 'z'), (0.5, 0.5)), (('x', 'y'), (1.0, 1.0))]
"""  # noqa: E501

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from raymerge.sweep.identity import canonical_key
from raymerge.sweep.spec import ChooseGroup, SweepSpec


class Candidate(NamedTuple):
    """One merge of the plan before it gets its identity."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str
    params: dict[str, Any]


def group_names(group, spec: SweepSpec) -> list[str]:
    """The adapter names a group merges from, as listed (repeats kept, for the checks to name)."""
    if isinstance(group, ChooseGroup):
        return list(group.from_ if group.from_ is not None else spec.adapters)
    return list(group.adapters)


def search_pool(spec: SweepSpec) -> list[str]:
    """The adapters a spec's search may merge (it must have a `search`)."""
    search = spec.search
    if search.adapters is not None:
        return list(search.adapters)
    return list(search.from_ if search.from_ is not None else spec.adapters)


def _adapter_sets(group, spec: SweepSpec) -> Iterator[tuple[str, ...]]:
    names = list(dict.fromkeys(group_names(group, spec)))
    if isinstance(group, ChooseGroup):
        yield from itertools.combinations(names, group.choose)
    else:
        yield tuple(names)


def _makes_set(group, spec: SweepSpec, names: tuple[str, ...]) -> bool:
    """Whether `group` generates the adapter set `names` (in that order)."""
    members = list(dict.fromkeys(group_names(group, spec)))
    if not isinstance(group, ChooseGroup):
        return tuple(members) == names
    position = {name: i for i, name in enumerate(members)}
    return (
        len(names) == group.choose
        and all(name in position for name in names)
        and all(position[a] < position[b] for a, b in itertools.pairwise(names))
    )


@dataclass(frozen=True)
class _Definition:
    """What one group makes, as far as de-duplication needs it (the size of its spec entry,
    not of its expansion): its method expansions and weight vectors, by canonical form."""

    group: Any
    methods: list[tuple[str, dict[str, Any], str]]
    vectors: list[tuple[tuple[float, ...], str]]

    @property
    def method_keys(self) -> frozenset[str]:
        return frozenset(key for *_, key in self.methods)

    @property
    def vector_keys(self) -> frozenset[str]:
        return frozenset(key for _, key in self.vectors)

    @classmethod
    def of(cls, group) -> _Definition:
        methods, seen = [], set()
        for method in group.methods:  # an entry's merge an earlier entry makes comes once
            for combination_type, params in method.expand():
                key = canonical_key([combination_type, params])
                if key not in seen:
                    seen.add(key)
                    methods.append((combination_type, params, key))
        vectors: dict[str, tuple[float, ...]] = {}
        for vector in group.weights:
            weights = tuple(float(w) for w in vector)
            vectors.setdefault(canonical_key(weights), weights)
        return cls(group, methods, [(w, k) for k, w in vectors.items()])


def candidates(spec: SweepSpec) -> Iterator[Candidate]:
    """Every merge of the spec once, group by group, in a deterministic order.

    Repeats are dropped by construction: within a group, weight vectors and method expansions
    are de-duplicated by definition; across groups, a merge that an earlier group's definition
    makes (its adapter set, a weight vector and a method expansion) is skipped.
    """
    earlier: list[_Definition] = []
    for group in spec.combinations:
        definition = _Definition.of(group)
        for names in _adapter_sets(group, spec):
            making_set = [
                (d.method_keys, d.vector_keys) for d in earlier if _makes_set(d.group, spec, names)
            ]
            for weights, weight_key in definition.vectors:
                making = [keys for keys, vectors in making_set if weight_key in vectors]
                for combination_type, params, key in definition.methods:
                    if not any(key in keys for keys in making):
                        yield Candidate(names, weights, combination_type, params)
        earlier.append(definition)
