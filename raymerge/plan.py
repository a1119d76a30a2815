"""Lazy expansion of a sweep spec into merge tasks, the merge identity, and pre-flight checks.

Every check that needs no cluster runs here, before anything is written, and all problems are
reported together.

Example:
    >>> plan = load_plan("jobs/demo.yaml")  # doctest: +SKIP
    >>> next(plan.tasks()).merge_id  # doctest: +SKIP
    '5d1c0a9be2f4417e'
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raymerge import compat, storage
from raymerge.adapters import AdapterInfo, inspect_adapter, inspect_base_model, read_base_shapes
from raymerge.errors import InputError, SpecError
from raymerge.methods import COMBINATION_TYPES
from raymerge.spec import ChooseGroup, SweepSpec, parse_spec, read_spec_file


@dataclass(frozen=True)
class MergeTask:
    """One merge: which adapters, with which weights, how. Small enough to ship to any worker."""

    merge_id: str
    adapters: tuple[str, ...]
    """Adapter names, in merge order."""
    weights: tuple[float, ...]
    combination_type: str
    params: dict[str, Any]
    """The combination type's parameters, PEFT's names, defaults filled in."""
    seed: int
    """The sweep's seed."""
    merge_seed: int
    """This merge's own random seed (DARE masks), derived from its identity."""
    output_dtype: str
    """dtype the merged adapter is written in (the arithmetic is float32)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"adapters": list(self.adapters), "weights": list(self.weights)}


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


@dataclass
class Plan:
    """A validated sweep: resolved locations, inspected adapters, and its tasks (lazily)."""

    spec: SweepSpec
    spec_path: Path
    base_model: str
    """Resolved base model location (absolute path or URI), or a hub id."""
    output: str
    """Resolved output location."""
    adapters: dict[str, AdapterInfo]
    eval_sets: dict[str, str] = field(default_factory=dict)
    """Eval set name -> resolved location (empty without `evaluate`)."""

    def adapter_uris(self) -> dict[str, str]:
        return {name: info.uri for name, info in self.adapters.items()}

    def tasks(self) -> Iterator[MergeTask]:
        """Every merge, group by group; a merge listed by two groups comes once."""
        seen: set[str] = set()
        for group in self.spec.combinations:
            for names in _adapter_sets(group, self.spec):
                located = [(name, self.spec.adapters[name].strip().rstrip("/")) for name in names]
                output_dtype = self.output_dtype(names)
                for weights in group.weights:
                    for method in group.methods:
                        for combination_type, params in method.expand():
                            mid = merge_id(
                                located,
                                weights,
                                combination_type,
                                params,
                                self.spec.seed,
                                output_dtype,
                            )
                            if mid in seen:
                                continue
                            seen.add(mid)
                            yield MergeTask(
                                merge_id=mid,
                                adapters=tuple(names),
                                weights=tuple(weights),
                                combination_type=combination_type,
                                params=params,
                                seed=self.spec.seed,
                                merge_seed=merge_seed(mid),
                                output_dtype=output_dtype,
                            )

    def output_dtype(self, names: tuple[str, ...]) -> str:
        """The spec's output_dtype, else the inputs' common dtype, else float32."""
        if self.spec.output_dtype:
            return self.spec.output_dtype
        dtypes = {self.adapters[name].dtype for name in names}
        return dtypes.pop() if len(dtypes) == 1 else "float32"

    def counts(self) -> dict[str, int]:
        """Number of merges per combination type."""
        return dict(Counter(task.combination_type for task in self.tasks()))

    def adapters_used(self) -> list[str]:
        """Names of the adapters that some merge uses, in spec order."""
        used = {name for group in self.spec.combinations for name in _group_names(group, self.spec)}
        return [name for name in self.spec.adapters if name in used]

    def summary(self) -> dict[str, Any]:
        """The plan in machine-readable form (without the task list)."""
        counts = self.counts()
        return {
            "spec": str(self.spec_path),
            "base_model": self.base_model,
            "output": self.output,
            "total": sum(counts.values()),
            "by_type": counts,
            "adapters": {
                name: {
                    "uri": self.adapters[name].uri,
                    "r": self.adapters[name].config["r"],
                    "lora_alpha": self.adapters[name].config.get("lora_alpha"),
                    "base_model": self.adapters[name].base_model,
                }
                for name in self.adapters_used()
            },
        }


def load_plan(spec_path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Validate a spec file and its inputs; raises SpecError/InputError listing every problem.

    `overrides` replace top-level spec keys (CLI flags); a relative `output` given there is
    relative to the current directory, while locations in the spec file are relative to the file.
    """
    spec_path = Path(spec_path).resolve()
    base_dir = spec_path.parent
    overrides = dict(overrides or {})
    if overrides.get("output"):
        overrides["output"] = storage.resolve(overrides["output"], Path.cwd())
    raw = read_spec_file(spec_path)
    spec_problems: list[str] = []
    input_problems: list[str] = []
    try:
        spec = parse_spec({**raw, **{k: v for k, v in overrides.items() if v is not None}})
    except SpecError as exc:
        spec, spec_problems = None, exc.problems

    # Inspect adapters even when the spec has errors, so that one run reports everything.
    raw_adapters = spec.adapters if spec else raw.get("adapters")
    storage_options = spec.storage_options if spec else {}
    allow_pickle = spec.allow_pickle if spec else raw.get("allow_pickle") is True
    adapters: dict[str, AdapterInfo] = {}
    if isinstance(raw_adapters, dict):
        for name, location in raw_adapters.items():
            if not isinstance(location, str):
                continue
            try:
                uri = storage.resolve(location, base_dir)
                adapters[name] = inspect_adapter(
                    name, uri, storage_options, allow_pickle=allow_pickle
                )
                input_problems.extend(compat.feature_problems(adapters[name]))
            except ValueError as exc:
                spec_problems.append(f"adapters.{name}: {exc}")
            except InputError as exc:
                input_problems.extend(exc.problems)

    base_model = output = ""
    eval_sets: dict[str, str] = {}
    if spec is not None:
        try:
            base_model = _resolve_base_model(spec.base_model, base_dir, storage_options)
            input_problems.extend(
                _base_shape_problems(base_model, adapters, base_dir, storage_options)
            )
        except InputError as exc:
            input_problems.extend(exc.problems)
        except ValueError as exc:
            spec_problems.append(f"base_model: {exc}")
        try:
            output = storage.resolve(spec.output, base_dir)
        except ValueError as exc:
            spec_problems.append(f"output: {exc}")
        spec_problems.extend(_group_problems(spec))
        input_problems.extend(_compatibility_problems(spec, adapters))
        if spec.evaluate:
            eval_sets, problems = _eval_sets(spec, base_dir, base_model)
            input_problems.extend(problems)

    if spec_problems:
        raise SpecError(spec_problems + input_problems)
    if input_problems:
        raise InputError(input_problems)
    return Plan(spec, spec_path, base_model, output, adapters, eval_sets)


def _resolve_base_model(location: str, base_dir: Path, storage_options: dict[str, Any]) -> str:
    if storage.looks_like_hub_id(location, base_dir):
        return location  # resolved by from_pretrained on the workers; not checkable offline
    uri = storage.resolve(location, base_dir)
    inspect_base_model(uri, storage_options)
    return uri


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _eval_sets(spec: SweepSpec, base_dir: Path, base_model: str) -> tuple[dict[str, str], list]:
    """Resolved eval set locations, and what is missing: a set, or the base model's tokenizer."""
    options = spec.storage_options
    found, problems = {}, []
    for name, location in spec.evaluate.datasets.items():
        try:
            uri = storage.resolve(location, base_dir)
            if storage.exists(uri, options):
                found[name] = uri
            else:
                problems.append(f"evaluate.datasets.{name}: {uri} does not exist")
        except Exception as exc:
            problems.append(f"evaluate.datasets.{name}: {location}: {exc}")
    local_base = base_model and not storage.looks_like_hub_id(base_model, base_dir)
    if local_base and not any(
        storage.exists(storage.join(base_model, f), options) for f in TOKENIZER_FILES
    ):
        problems.append(
            f"evaluate: the base model at {base_model} has no tokenizer (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer beside the base model "
            "(tokenizer.save_pretrained) to score merges"
        )
    return found, problems


def _base_shape_problems(
    base_model: str, adapters: dict[str, AdapterInfo], base_dir: Path, storage_options
) -> list[str]:
    """Every adapter's factors against the base model's weight shapes (headers only)."""
    if storage.looks_like_hub_id(base_model, base_dir):
        return []  # not readable offline: from_pretrained checks shapes on the workers
    shapes = read_base_shapes(base_model, storage_options)
    if shapes is None:
        return []
    return [p for info in adapters.values() for p in compat.base_shape_problems(info, shapes)]


def _group_names(group, spec: SweepSpec) -> list[str]:
    if isinstance(group, ChooseGroup):
        return list(group.from_ if group.from_ is not None else spec.adapters)
    return list(group.adapters)


def _adapter_sets(group, spec: SweepSpec) -> Iterator[tuple[str, ...]]:
    names = _group_names(group, spec)
    if isinstance(group, ChooseGroup):
        yield from itertools.combinations(names, group.choose)
    else:
        yield tuple(names)


def _group_problems(spec: SweepSpec) -> list[str]:
    """Checks across keys: names exist, no duplicates, weights fit, choose fits."""
    problems = []
    known = ", ".join(spec.adapters)
    for i, group in enumerate(spec.combinations):
        key = f"combinations[{i}].{'from' if isinstance(group, ChooseGroup) else 'adapters'}"
        names = _group_names(group, spec)
        for name in dict.fromkeys(names):
            if name not in spec.adapters:
                problems.append(
                    f"{key}: unknown adapter {name!r}; the spec's adapters are: {known}"
                )
            if names.count(name) > 1:
                problems.append(f"{key}: adapter {name!r} is listed twice; list each adapter once")
        size = group.choose if isinstance(group, ChooseGroup) else len(names)
        if isinstance(group, ChooseGroup) and group.choose > len(names):
            problems.append(
                f"combinations[{i}].choose: {group.choose} is more than the {len(names)} "
                f"adapters to choose from"
            )
        for j, weights in enumerate(group.weights):
            if len(weights) != size:
                problems.append(
                    f"combinations[{i}].weights[{j}]: {weights} has {len(weights)} weight(s) "
                    f"but each merge of this group has {size} adapters; give one weight per adapter"
                )
    return problems


def _compatibility_problems(spec: SweepSpec, adapters: dict[str, AdapterInfo]) -> list[str]:
    """Checks that need the adapters' configs: equal ranks where required, one base model."""
    problems = []
    used: set[str] = set()
    for i, group in enumerate(spec.combinations):
        names = [n for n in dict.fromkeys(_group_names(group, spec)) if n in adapters]
        used.update(names)
        types = [t for method in group.methods for t in method.combination_type or []]
        problems.extend(compat.group_problems(i, types, [adapters[n] for n in names]))
        ranks = {n: adapters[n].rank for n in names}
        if len(set(ranks.values())) < 2:
            continue
        equal_rank_types = sorted(
            {
                t
                for method in group.methods
                for t in method.combination_type or []
                if COMBINATION_TYPES[t].equal_rank
            }
        )
        if equal_rank_types:
            listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
            problems.append(
                f"combinations[{i}]: {', '.join(equal_rank_types)} need adapters of equal rank, "
                f"but the group has {listed}; use cat or an svd type for these, or adapters of "
                "one rank"
            )
    bases: dict[str | None, list[str]] = {}
    for name in spec.adapters:
        if name in used and name in adapters:
            bases.setdefault(adapters[name].base_model, []).append(name)
    if len(bases) > 1 and not spec.allow_base_mismatch:
        listed = "; ".join(f"{', '.join(ns)} -> {b!r}" for b, ns in bases.items())
        problems.append(
            "adapters were trained on different base models (base_model_name_or_path: "
            f"{listed}); merge adapters of one base, or set `allow_base_mismatch: true` if "
            "these names denote the same weights"
        )
    return problems
