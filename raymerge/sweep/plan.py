"""Lazy expansion of a sweep spec into merge tasks, the merge identity, and pre-flight checks.

Every check that needs no cluster runs here, before anything is written, and all problems are
reported together. The plan is never materialised: tasks are generated group by group, and a
merge that an earlier group (or an earlier entry of its own group) already stands for is dropped
by testing the definitions, not by remembering ids, so memory stays flat however large the sweep.

Example:
    >>> spec = parse_spec({"base_model": "b", "adapters": {"x": "x", "y": "y", "z": "z"},
    ...     "output": "o", "combinations": [
    ...         {"choose": 2, "weights": [[0.5, 0.5]], "methods": [{"combination_type": "cat"}]},
    ...         {"adapters": ["x", "y"], "weights": [[0.5, 0.5], [1, 1]],
    ...          "methods": [{"combination_type": "cat"}]}]})
    >>> [(c.adapters, c.weights) for c in candidates(spec)]
    [(('x', 'y'), (0.5, 0.5)), (('x', 'z'), (0.5, 0.5)), (('y', 'z'), (0.5, 0.5)), (('x', 'y'), (1.0, 1.0))]
    >>> len(merge_id([("x", "x"), ("y", "y")], [0.5, 0.5], "cat", {}, seed=0))
    16
"""  # noqa: E501

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from raymerge.errors import InputError, SpecError
from raymerge.load.adapters import AdapterInfo, inspect_adapter, inspect_base_model
from raymerge.merge import compat
from raymerge.merge.registry import METHODS, RankRule
from raymerge.score import evalsets
from raymerge.score.objective import MEAN_LOSS
from raymerge.store import storage
from raymerge.sweep.spec import ChooseGroup, SweepSpec, parse_spec, read_spec_file
from raymerge.task import EvalConfig, MergeTask, WorkerConfig


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


class Candidate(NamedTuple):
    """One merge of the plan before it gets its identity."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str
    params: dict[str, Any]


def _canonical(value: Any) -> str:
    """Equality as the merge id sees it (-0.0 and 0.0 differ there, so they differ here)."""
    return json.dumps(value, sort_keys=True)


def group_names(group, spec: SweepSpec) -> list[str]:
    if isinstance(group, ChooseGroup):
        return list(group.from_ if group.from_ is not None else spec.adapters)
    return list(group.adapters)


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
                key = _canonical([combination_type, params])
                if key not in seen:
                    seen.add(key)
                    methods.append((combination_type, params, key))
        vectors: dict[str, tuple[float, ...]] = {}
        for vector in group.weights:
            weights = tuple(float(w) for w in vector)
            vectors.setdefault(_canonical(weights), weights)
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
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Eval set name -> its resolved location (uri), kind and options (empty without
    `evaluate`)."""

    def adapter_uris(self) -> dict[str, str]:
        return {name: info.uri for name, info in self.adapters.items()}

    @property
    def task_type(self) -> str | None:
        """The adapters' PEFT task type (the first one set, in spec order)."""
        return next((a.task_type for a in self.adapters.values() if a.task_type), None)

    def tasks(self) -> Iterator[MergeTask]:
        """Every merge, group by group; a merge listed twice comes once."""
        for candidate in candidates(self.spec):
            yield self.task(candidate)

    def task(self, candidate: Candidate, trial: int | None = None) -> MergeTask:
        """The merge task for a candidate: its identity, seed and output dtype."""
        located = [(n, self.spec.adapters[n].strip().rstrip("/")) for n in candidate.adapters]
        output_dtype = self.output_dtype(candidate.adapters)
        mid = merge_id(
            located,
            candidate.weights,
            candidate.combination_type,
            candidate.params,
            self.spec.seed,
            output_dtype,
        )
        return MergeTask(
            merge_id=mid,
            adapters=tuple(candidate.adapters),
            weights=tuple(candidate.weights),
            combination_type=candidate.combination_type,
            params=candidate.params,
            seed=self.spec.seed,
            merge_seed=merge_seed(mid),
            output_dtype=output_dtype,
            trial=trial,
        )

    def output_dtype(self, names: tuple[str, ...]) -> str:
        """The spec's output_dtype, else the inputs' common dtype, else float32."""
        if self.spec.output_dtype:
            return self.spec.output_dtype
        dtypes = {self.adapters[name].dtype for name in names}
        return dtypes.pop() if len(dtypes) == 1 else "float32"

    def counts(self) -> dict[str, int]:
        """Number of merges per combination type (no merge is hashed or built to count it)."""
        return dict(Counter(c.combination_type for c in candidates(self.spec)))

    def total(self) -> int:
        return sum(self.counts().values())

    def adapters_used(self) -> list[str]:
        """Names of the adapters that some merge uses, in spec order."""
        used = {name for group in self.spec.combinations for name in group_names(group, self.spec)}
        if self.spec.search is not None:
            used |= set(_search_pool(self.spec))
        return [name for name in self.spec.adapters if name in used]

    def worker_config(self) -> WorkerConfig:
        """What every worker of this sweep is started with."""
        spec = self.spec
        evaluate = None
        if spec.evaluate is not None:
            lm_eval = None
            if spec.evaluate.lm_eval is not None:
                lm_eval = spec.evaluate.lm_eval.model_dump()
                if lm_eval["include_path"]:
                    lm_eval["include_path"] = storage.resolve(
                        lm_eval["include_path"], self.spec_path.parent
                    )
            evaluate = EvalConfig(
                datasets=self.eval_sets,
                max_samples=spec.evaluate.max_samples,
                batch_size=spec.evaluate.batch_size,
                max_length=spec.evaluate.max_length,
                adapters_per_pass=spec.evaluate.adapters_per_pass,
                lm_eval=lm_eval,
                objective=spec.evaluate.objective_terms(),
            )
        cache_bytes = int(spec.adapter_cache_gb * 2**30) if spec.adapter_cache_gb else None
        return WorkerConfig(
            base_model=self.base_model,
            adapter_uris=self.adapter_uris(),
            output=self.output,
            storage_options=dict(spec.storage_options),
            task_type=self.task_type,
            num_threads=max(1, int(spec.cpus_per_worker)),
            torch_dtype=spec.torch_dtype,
            gpu_headroom_gb=spec.gpu_headroom_gb,
            adapter_cache_bytes=cache_bytes,
            engine=spec.engine,
            evaluate=evaluate,
        )

    def summary(self) -> dict[str, Any]:
        """The plan in machine-readable form (without the task list)."""
        counts = self.counts()
        search = self.spec.search
        return {
            **(
                {"search": {"budget": search.budget, "sampler": search.sampler_name()}}
                if search
                else {}
            ),
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
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(overrides.get("output"), str) and overrides["output"].strip():
        overrides["output"] = storage.resolve(overrides["output"], Path.cwd())
    raw = read_spec_file(spec_path)
    spec_problems: list[str] = []
    input_problems: list[str] = []
    try:
        spec = parse_spec({**raw, **overrides})
    except SpecError as exc:
        spec, spec_problems = None, exc.problems

    # Inspect adapters even when the spec has errors, so that one run reports everything.
    raw_adapters = spec.adapters if spec else raw.get("adapters")
    storage_options = spec.storage_options if spec else {}
    allow_pickle = spec.allow_pickle if spec else raw.get("allow_pickle") is True
    adapters: dict[str, AdapterInfo] = {}
    if isinstance(raw_adapters, dict):
        for name, location in raw_adapters.items():
            if not isinstance(location, str) or not location.strip():
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
    eval_sets: dict[str, dict[str, Any]] = {}
    if spec is not None:
        spec_problems.extend(_duplicate_locations(spec, base_dir))
        try:
            base_model = _resolve_base_model(spec.base_model, base_dir, storage_options)
            input_problems.extend(_base_problems(spec, base_model, adapters, base_dir))
        except InputError as exc:
            input_problems.extend(exc.problems)
        except ValueError as exc:
            spec_problems.append(f"base_model: {exc}")
        try:
            output = storage.resolve(spec.output, base_dir)
            spec_problems.extend(_output_problems(output, base_model, adapters, storage_options))
        except ValueError as exc:
            spec_problems.append(f"output: {exc}")
        spec_problems.extend(_group_problems(spec))
        spec_problems.extend(_search_problems(spec))
        input_problems.extend(_compatibility_problems(spec, adapters))
        input_problems.extend(_search_compatibility(spec, adapters))
        if spec.evaluate:
            eval_sets, problems = _eval_sets(spec, base_dir, base_model)
            input_problems.extend(problems)

    if spec_problems:
        raise SpecError(spec_problems + input_problems)
    if input_problems:
        raise InputError(input_problems)
    return Plan(spec, spec_path, base_model, output, adapters, eval_sets)


def validate_offline(spec_path: str | Path) -> SweepSpec:
    """Every check that reads no input (the spec's keys, values and cross-key rules): what
    `raymerge submit` runs before anything leaves this machine."""
    spec = parse_spec(read_spec_file(spec_path))
    problems = _group_problems(spec) + _search_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def _resolve_base_model(location: str, base_dir: Path, storage_options: dict[str, Any]) -> str:
    if storage.looks_like_hub_id(location, base_dir):
        return location  # resolved by from_pretrained on the workers; not checkable offline
    uri = storage.resolve(location, base_dir)
    inspect_base_model(uri, storage_options)
    return uri


BASE_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def objective(spec: SweepSpec):
    """The sweep's objective (None without `evaluate`)."""
    from raymerge.score.objective import Objective

    return Objective.parse(spec.evaluate.objective_terms()) if spec.evaluate else None


def _base_problems(
    spec: SweepSpec, base_model: str, adapters: dict[str, AdapterInfo], base_dir: Path
) -> list[str]:
    """Every adapter's factors against the base model's layers (from its config, on the meta
    device: no weight read), and its weights where the sweep needs them."""
    if storage.looks_like_hub_id(base_model, base_dir):
        return []  # not readable offline: from_pretrained checks shapes on the workers
    from raymerge.merge.layout import layout_from_config_json

    options = spec.storage_options
    config = storage.read_bytes(storage.join(base_model, "config.json"), options)
    task_type = next((a.task_type for a in adapters.values() if a.task_type), None)
    try:
        layout = layout_from_config_json(config, task_type)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return [
            f"base_model {base_model}: transformers cannot build this model from its "
            f"config.json ({type(exc).__name__}: {exc}); is it a transformers model?"
        ]
    problems = [p for info in adapters.values() for p in compat.base_shape_problems(info, layout)]
    needs_weights = spec.evaluate is not None or spec.engine == "peft"
    if needs_weights and not any(
        storage.exists(storage.join(base_model, f), options) for f in BASE_WEIGHT_FILES
    ):
        why = "evaluate" if spec.evaluate is not None else "engine: peft"
        files = ", ".join(BASE_WEIGHT_FILES)
        problems.append(
            f"base_model {base_model}: has config.json but no weights ({files}), which `{why}` "
            "needs; save the model with save_pretrained"
        )
    return problems


def _duplicate_locations(spec: SweepSpec, base_dir: Path) -> list[str]:
    """One location under two names would merge an adapter with itself."""
    by_location: dict[str, list[str]] = {}
    for name, location in spec.adapters.items():
        try:
            by_location.setdefault(storage.resolve(location, base_dir), []).append(name)
        except ValueError:
            continue  # reported with the adapter
    return [
        f"adapters: {', '.join(names)} name the same location ({location}); give each adapter "
        "once (a merge of an adapter with itself is a reweighting: change its weight instead)"
        for location, names in by_location.items()
        if len(names) > 1
    ]


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _output_problems(
    output: str, base_model: str, adapters: dict[str, AdapterInfo], storage_options
) -> list[str]:
    """The output must be a folder of its own: not a file, not inside an input."""
    problems = []
    inputs = [(f"adapter {n!r}", info.uri) for n, info in adapters.items()]
    if base_model and ("://" in base_model or base_model.startswith("/")):
        inputs.append(("base_model", base_model))
    for what, uri in inputs:
        if _inside(output, uri):
            problems.append(
                f"output: {output} is inside the folder of {what} ({uri}); merges would be "
                "written among its files: choose an output outside every input"
            )
    if not problems and storage.is_file(output, storage_options):
        problems.append(
            f"output: {output} is an existing file; give a folder (new, or one a run of this "
            "spec wrote)"
        )
    return problems


def _eval_sets(spec: SweepSpec, base_dir: Path, base_model: str) -> tuple[dict[str, dict], list]:
    """Resolved and checked eval sets (every example read: a bad line is named here, before any
    cluster work), and what else is missing: the base model's tokenizer, lm-eval."""
    options = spec.storage_options
    evaluate = spec.evaluate
    found, problems = {}, []
    for name, entry in evaluate.sets().items():
        try:
            uri = storage.resolve(entry.path, base_dir)
        except ValueError as exc:
            problems.append(f"evaluate.datasets.{name}: {exc}")
            continue
        if not storage.exists(uri, options):
            problems.append(f"evaluate.datasets.{name}: {uri} does not exist")
            continue
        try:
            evalsets.load(name, uri, entry.kind, evaluate.max_samples, options)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        found[name] = {"uri": uri, **entry.model_dump(exclude={"path"})}
    local_base = base_model and not storage.looks_like_hub_id(base_model, base_dir)
    if local_base and not any(
        storage.exists(storage.join(base_model, f), options) for f in TOKENIZER_FILES
    ):
        problems.append(
            f"evaluate: the base model at {base_model} has no tokenizer (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer beside the base model "
            "(tokenizer.save_pretrained) to score merges"
        )
    if evaluate.lm_eval is not None:
        problems.extend(_lm_eval_problems(evaluate.lm_eval, base_dir))
    problems.extend(_objective_problems(evaluate))
    return found, problems


def _lm_eval_problems(lm_eval, base_dir: Path) -> list[str]:
    from raymerge.score import harness

    problems = []
    if not harness.available():
        problems.append(f"evaluate.lm_eval needs lm-evaluation-harness: {harness.INSTALL}")
    if lm_eval.include_path is not None:
        folder = Path(storage.resolve(lm_eval.include_path, base_dir))
        if not folder.is_dir():
            problems.append(
                f"evaluate.lm_eval.include_path: {folder} is not a folder (of task YAMLs)"
            )
    return problems


def _objective_problems(evaluate) -> list[str]:
    """Each objective metric names an eval set (or lm-eval task) and a metric it reports."""
    sets = evaluate.sets()
    tasks = set(evaluate.lm_eval.tasks) if evaluate.lm_eval else set()
    problems = []
    for term in evaluate.objective_terms():
        metric = term["metric"]
        if metric == MEAN_LOSS:
            if not any(s.kind == "text" for s in sets.values()):
                problems.append("evaluate.objective: mean_loss needs at least one text set")
            continue
        name, _, key = metric.rpartition(".")
        if name in sets:
            known = evalsets.METRICS[sets[name].kind]
            if key not in known:
                problems.append(
                    f"evaluate.objective: {metric!r}: a {sets[name].kind} set reports "
                    f"{', '.join(known)}"
                )
        elif name not in tasks:
            listed = ", ".join([*sets, *tasks]) or "none"
            problems.append(
                f"evaluate.objective: {metric!r} names no eval set or lm_eval task (they are: "
                f"{listed}); write SET.METRIC, e.g. {next(iter(sets), 'qa')}.loss, or mean_loss"
            )
    return problems


def _group_problems(spec: SweepSpec) -> list[str]:
    """Checks across keys: names exist, no duplicates, weights fit, choose fits."""
    problems = []
    known = ", ".join(spec.adapters)
    for i, group in enumerate(spec.combinations):
        key = f"combinations[{i}].{'from' if isinstance(group, ChooseGroup) else 'adapters'}"
        names = group_names(group, spec)
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


def _search_pool(spec: SweepSpec) -> list[str]:
    search = spec.search
    if search.adapters is not None:
        return list(search.adapters)
    return list(search.from_ if search.from_ is not None else spec.adapters)


def _search_problems(spec: SweepSpec) -> list[str]:
    """A search's adapters exist and fit `choose`; its weights and objectives name what is
    there."""
    if spec.search is None:
        return []
    search, problems = spec.search, []
    known = ", ".join(spec.adapters)
    pool = _search_pool(spec)
    key = "search.adapters" if search.adapters is not None else "search.from"
    for name in dict.fromkeys(pool):
        if name not in spec.adapters:
            problems.append(f"{key}: unknown adapter {name!r}; the spec's adapters are: {known}")
        if pool.count(name) > 1:
            problems.append(f"{key}: adapter {name!r} is listed twice; list each adapter once")
    if search.choose is not None and search.choose > len(pool):
        problems.append(
            f"search.choose: {search.choose} is more than the {len(pool)} adapters to choose from"
        )
    if isinstance(search.weights, dict):
        missing = [n for n in pool if n not in search.weights]
        if missing:
            problems.append(
                f"search.weights: no range for {', '.join(missing)}; give one per adapter, or one "
                "range for all ({low: 0, high: 1})"
            )
    if search.objectives and spec.evaluate is not None:
        terms = [t if isinstance(t, str) else t.model_dump() for t in search.objectives]
        problems += [
            p.replace("evaluate.objective", "search.objectives")
            for p in _objective_problems(spec.evaluate.model_copy(update={"objective": terms}))
        ]
    return problems


def _search_compatibility(spec: SweepSpec, adapters: dict[str, AdapterInfo]) -> list[str]:
    """Equal-rank types in a search need adapters of one rank throughout its pool."""
    if spec.search is None:
        return []
    types = {t for method in spec.search.methods for t in method.combination_type}
    equal = sorted(t for t in types if METHODS[t].rank is RankRule.EQUAL)
    ranks = {n: adapters[n].rank for n in _search_pool(spec) if n in adapters}
    if equal and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        return [
            f"search: {', '.join(equal)} need adapters of equal rank, but the search may merge "
            f"{listed}; use cat or an svd type, or adapters of one rank"
        ]
    return []


def _compatibility_problems(spec: SweepSpec, adapters: dict[str, AdapterInfo]) -> list[str]:
    """Checks that need the adapters' configs: equal ranks where required, one base model."""
    problems = []
    used: set[str] = set()
    for i, group in enumerate(spec.combinations):
        names = [n for n in dict.fromkeys(group_names(group, spec)) if n in adapters]
        used.update(names)
        types = [t for method in group.methods for t in method.combination_type or []]
        problems.extend(compat.group_problems(i, types, [adapters[n] for n in names]))
        ranks = {n: adapters[n].rank for n in names}
        if len(set(ranks.values())) < 2:
            continue
        equal_rank_types = sorted({t for t in types if METHODS[t].rank is RankRule.EQUAL})
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
