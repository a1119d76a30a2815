"""Pre-flight checks that read a sweep's inputs: adapters, base model, output, eval sets.

Every check that needs no cluster runs before anything is written, and each returns the problems
it found rather than raising, so that one run reports them all. Problems are split as the plan
raises them: those the spec's author fixes in the spec (a location that cannot be resolved, an
output inside an input) and those of the inputs themselves (a missing file, mismatched ranks).

Example:
    >>> from pathlib import Path
    >>> adapters, spec_problems, input_problems = inspect_adapters({"x": " "}, Path("."), {})
    >>> adapters, spec_problems, input_problems
    ({}, [], [])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from raymerge.errors import InputError
from raymerge.load.adapters import AdapterInfo, inspect_adapter, inspect_base_model
from raymerge.merge import compat
from raymerge.merge.registry import METHODS, RankRule
from raymerge.score import evalsets
from raymerge.store import hub, storage
from raymerge.sweep.expand import group_names, search_pool
from raymerge.sweep.rules import objective_problems
from raymerge.sweep.spec import SweepSpec

BASE_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def inspect_adapters(
    locations: Any, base_dir: Path, storage_options: dict[str, Any], allow_pickle: bool = False
) -> tuple[dict[str, AdapterInfo], list[str], list[str]]:
    """Each adapter's config and tensors, read from its location: (adapters, spec problems,
    input problems). `locations` may come from an invalid spec: what is not a location is
    skipped, as the spec's own check names it."""
    adapters: dict[str, AdapterInfo] = {}
    spec_problems: list[str] = []
    input_problems: list[str] = []
    if not isinstance(locations, dict):
        return adapters, spec_problems, input_problems
    for name, location in locations.items():
        if not isinstance(location, str) or not location.strip():
            continue
        try:
            uri = storage.resolve(location, base_dir)
            adapters[name] = inspect_adapter(name, uri, storage_options, allow_pickle=allow_pickle)
            input_problems.extend(compat.feature_problems(adapters[name]))
        except ValueError as exc:
            spec_problems.append(f"adapters.{name}: {exc}")
        except InputError as exc:
            input_problems.extend(exc.problems)
    return adapters, spec_problems, input_problems


@dataclass
class InputChecks:
    """What the checks of a valid spec's inputs resolved, and the problems they found."""

    base_model: str = ""
    """Resolved base model location (absolute path or URI), or a hub id; empty if unresolved."""
    output: str = ""
    """Resolved output location; empty if unresolved."""
    eval_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Eval set name -> its resolved location (uri), kind and options."""
    spec_problems: list[str] = field(default_factory=list)
    input_problems: list[str] = field(default_factory=list)


def check_inputs(spec: SweepSpec, base_dir: Path, adapters: dict[str, AdapterInfo]) -> InputChecks:
    """Resolve and check the base model, the output and the eval sets of a valid spec, and the
    inspected adapters against them and against each other."""
    checks = InputChecks()
    options = spec.storage_options
    checks.spec_problems.extend(_duplicate_locations(spec, base_dir))
    base_files = None
    try:
        checks.base_model, base_files = _resolve_base_model(spec.base_model, base_dir, options)
        checks.input_problems.extend(_base_problems(spec, checks.base_model, base_files, adapters))
    except InputError as exc:
        checks.input_problems.extend(exc.problems)
    except ValueError as exc:
        checks.spec_problems.append(f"base_model: {exc}")
    try:
        checks.output = storage.resolve(spec.output, base_dir)
        if hub.is_hub(checks.output):
            raise ValueError(
                f"{checks.output}: the Hub holds inputs only; write the sweep to a local folder "
                "or s3://"
            )
        checks.spec_problems.extend(
            _output_problems(checks.output, checks.base_model, adapters, options)
        )
    except ValueError as exc:
        checks.spec_problems.append(f"output: {exc}")
    checks.input_problems.extend(_compatibility_problems(spec, adapters))
    checks.input_problems.extend(_search_compatibility(spec, adapters))
    if spec.evaluate:
        checks.eval_sets, problems = _eval_sets(spec, base_dir, checks.base_model, base_files)
        checks.input_problems.extend(problems)
    return checks


class BaseFiles(NamedTuple):
    """How the plan reads the base model's files, and whether it has one (a Hub model's weights
    are listed, not fetched: the workers fetch them where they load them)."""

    read: Callable[[str], bytes]
    has: Callable[[str], bool]


def _resolve_base_model(
    location: str, base_dir: Path, storage_options: dict[str, Any]
) -> tuple[str, BaseFiles | None]:
    """The base model's location to load from (a Hub location pinned to its commit), checked,
    and its files (None for a bare hub id: from_pretrained resolves it on the workers)."""
    if storage.looks_like_hub_id(location, base_dir):
        return location, None
    uri = storage.resolve(location, base_dir)
    if not hub.is_hub(uri):
        inspect_base_model(uri, storage_options)
        return uri, BaseFiles(
            lambda f: storage.read_bytes(storage.join(uri, f), storage_options),
            lambda f: storage.exists(storage.join(uri, f), storage_options),
        )
    folder, commit = hub.fetch(uri, hub.MODEL_METADATA, f"base_model {uri}")
    inspect_base_model(str(folder), {})
    pinned = hub.pinned(uri, commit)
    listed = hub.listing(pinned)
    return pinned, BaseFiles(
        lambda f: (folder / f).read_bytes(),
        lambda f: (folder / f).exists() or listed is None or f in listed,
    )


def _base_problems(
    spec: SweepSpec, base_model: str, files: BaseFiles | None, adapters: dict[str, AdapterInfo]
) -> list[str]:
    """Every adapter's factors against the base model's layers (from its config, on the meta
    device: no weight read), and its weights where the sweep needs them."""
    if files is None:
        return []  # a bare hub id: from_pretrained checks shapes on the workers
    from raymerge.merge.layout import layout_from_config_json

    config = files.read("config.json")
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
    if needs_weights and not any(files.has(f) for f in BASE_WEIGHT_FILES):
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


def _eval_sets(
    spec: SweepSpec, base_dir: Path, base_model: str, base_files: BaseFiles | None
) -> tuple[dict[str, dict], list]:
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
            examples = evalsets.load(name, uri, entry.kind, evaluate.max_samples, options)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        found[name] = {
            "uri": uri,
            **entry.model_dump(exclude={"path"}),
            "examples": len(examples),
            "sha256": evalsets.digest(examples),  # a race's journal is of these examples
        }
    if base_files and not any(base_files.has(f) for f in TOKENIZER_FILES):
        problems.append(
            f"evaluate: the base model at {base_model} has no tokenizer (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer beside the base model "
            "(tokenizer.save_pretrained) to score merges"
        )
    if evaluate.lm_eval is not None:
        problems.extend(_lm_eval_problems(evaluate.lm_eval, base_dir))
    problems.extend(objective_problems(evaluate))
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


def _search_compatibility(spec: SweepSpec, adapters: dict[str, AdapterInfo]) -> list[str]:
    """Equal-rank types in a search need adapters of one rank throughout its pool."""
    if spec.search is None:
        return []
    types = {t for method in spec.search.methods for t in method.combination_type}
    equal = sorted(t for t in types if METHODS[t].rank is RankRule.EQUAL)
    ranks = {n: adapters[n].rank for n in search_pool(spec) if n in adapters}
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
