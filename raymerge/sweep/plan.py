"""The plan: a validated sweep, its merge tasks (lazily) and what its workers are started with.

`load_plan` runs every check that needs no cluster before anything is written, and reports all
problems together: the spec's own (`raymerge.sweep.spec`), those across its keys
(`raymerge.sweep.rules`) and those of its inputs (`raymerge.sweep.preflight`). The tasks come from
the spec's lazy expansion (`raymerge.sweep.expand`), each with its identity
(`raymerge.sweep.identity`).

Example:
    >>> from raymerge.sweep.spec import parse_spec
    >>> spec = parse_spec({"base_model": "b", "adapters": {"x": "x", "y": "y"}, "output": "o",
    ...     "combinations": [{"adapters": ["x", "y"], "weights": [[0.5, 0.5], [1, 1]],
    ...                       "methods": [{"combination_type": "cat"}]}]})
    >>> plan = Plan(spec, Path("sweep.yaml"), "b", "o", adapters={})
    >>> plan.counts()
    {'cat': 2}
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from raymerge.errors import InputError, SpecError
from raymerge.load.adapters import AdapterInfo
from raymerge.store import storage
from raymerge.sweep.expand import Candidate, candidates, group_names, search_pool
from raymerge.sweep.identity import located_adapters, merge_id, merge_seed
from raymerge.sweep.preflight import InputChecks, check_inputs, inspect_adapters
from raymerge.sweep.rules import offline_problems
from raymerge.sweep.spec import SweepSpec, parse_spec, read_spec_file
from raymerge.sweep.spec.tracking import (
    MlflowTarget,
    default_experiment,
    mlflow_installed,
    mlflow_target,
    redact_uri,
    tracking_problems,
    tracking_warning,
)
from raymerge.task import EvalConfig, MergeTask, WorkerConfig


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
        located = located_adapters(candidate.adapters, self.spec.adapters)
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
            used |= set(search_pool(self.spec))
        return [name for name in self.spec.adapters if name in used]

    def worker_config(self, in_process: bool = False) -> WorkerConfig:
        """What every worker of this sweep is started with (`in_process`: the one worker of
        a run without Ray, which uses the cores it has unless the spec says otherwise)."""
        spec = self.spec
        if spec.cpus_per_worker is not None:
            threads = max(1, int(spec.cpus_per_worker))
        else:
            threads = usable_cores() if in_process else 1
        cache_bytes = int(spec.adapter_cache_gb * 2**30) if spec.adapter_cache_gb else None
        return WorkerConfig(
            base_model=self.base_model,
            adapter_uris=self.adapter_uris(),
            output=self.output,
            storage_options=dict(spec.storage_options),
            task_type=self.task_type,
            num_threads=threads,
            torch_dtype=spec.torch_dtype,
            gpu_headroom_gb=spec.gpu_headroom_gb,
            gpus=spec.gpus_per_worker,
            adapter_cache_bytes=cache_bytes,
            engine=spec.engine,
            evaluate=self.eval_config(),
            write_queue_bytes=int(spec.writes.queue_gb * 2**30),
            writers=spec.writes.writers,
            upload_part_bytes=int(spec.writes.part_mb * 2**20),
            upload_concurrency=spec.writes.upload_concurrency,
        )

    def eval_config(self) -> EvalConfig | None:
        """How workers score merges (None without `evaluate`); an lm-eval include_path is
        resolved here, relative to the spec file, as workers may run elsewhere."""
        evaluate = self.spec.evaluate
        if evaluate is None:
            return None
        lm_eval = None
        if evaluate.lm_eval is not None:
            lm_eval = evaluate.lm_eval.model_dump()
            if lm_eval["include_path"]:
                lm_eval["include_path"] = storage.resolve(
                    lm_eval["include_path"], self.spec_path.parent
                )
        return EvalConfig(
            datasets=self.eval_sets,
            max_samples=evaluate.max_samples,
            batch_size=evaluate.batch_size,
            max_length=evaluate.max_length,
            adapters_per_pass=evaluate.adapters_per_pass,
            lm_eval=lm_eval,
            objective=evaluate.objective_terms(),
            normalize=evaluate.objective_normalize(),
        )

    def warnings(self) -> list[str]:
        """What is allowed but likely not meant (an objective one term will decide alone)."""
        from raymerge.score.objective import scale_warning

        parsed = objective(self.spec)
        warnings = [scale_warning(parsed) if parsed is not None else None]
        warnings.append(tracking_warning(self.spec.tracking, os.environ))
        return [warning for warning in warnings if warning]

    def tracking_target(self) -> MlflowTarget | None:
        """Where the sweep is to be tracked in MLflow (its uri, and its experiment: the output
        folder's name unless the spec names one), or None where it is not."""
        target = mlflow_target(self.spec.tracking, os.environ)
        if target is None or target.uri is None:
            return None
        return replace(target, experiment=target.experiment or default_experiment(self.output))

    def tracking(self) -> dict[str, str] | None:
        """Where the sweep is tracked in MLflow ({uri, experiment}, the uri as it may be
        printed), or None where it is not (MLflow not installed included)."""
        target = self.tracking_target()
        if target is None or not mlflow_installed():
            return None
        return {"uri": redact_uri(target.uri), "experiment": target.experiment}

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
            "warnings": self.warnings(),
            **({"tracking": {"mlflow": tracked}} if (tracked := self.tracking()) else {}),
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
    overrides = _given_overrides(overrides)
    raw = read_spec_file(spec_path)
    spec, spec_problems = _parse(raw, overrides)

    # Inspect adapters even when the spec has errors, so that one run reports everything.
    adapters, adapter_problems, input_problems = inspect_adapters(
        spec.adapters if spec else raw.get("adapters"),
        base_dir,
        spec.storage_options if spec else {},
        allow_pickle=spec.allow_pickle if spec else raw.get("allow_pickle") is True,
    )
    spec_problems = spec_problems + adapter_problems
    checks = InputChecks()
    if spec is not None:
        checks = check_inputs(spec, base_dir, adapters)
        spec_problems += checks.spec_problems + offline_problems(spec)
        spec_problems += tracking_problems(spec.tracking, os.environ)
        input_problems += checks.input_problems

    if spec_problems:
        raise SpecError(spec_problems + input_problems)
    if input_problems:
        raise InputError(input_problems)
    return Plan(spec, spec_path, checks.base_model, checks.output, adapters, checks.eval_sets)


def _given_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The overrides that were given (a flag left out is None); a relative `output` is resolved
    against the current directory here, before the spec file's folder could claim it."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(given.get("output"), str) and given["output"].strip():
        given["output"] = storage.resolve(given["output"], Path.cwd())
    return given


def _parse(raw: dict[str, Any], overrides: dict[str, Any]) -> tuple[SweepSpec | None, list[str]]:
    """The spec with its overrides, or None and the spec's problems."""
    try:
        return parse_spec({**raw, **overrides}), []
    except SpecError as exc:
        return None, list(exc.problems)


def validate_offline(spec_path: str | Path) -> SweepSpec:
    """Every check that reads no input (the spec's keys, values and cross-key rules): what
    `raymerge submit` runs before anything leaves this machine."""
    spec = parse_spec(read_spec_file(spec_path))
    problems = offline_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def objective(spec: SweepSpec, references: dict[str, Any] | None = None):
    """The sweep's objective (None without `evaluate`), its terms scaled by `references` (the
    scores of the base model and each input alone) where it is normalised."""
    from raymerge.score.objective import Objective

    if spec.evaluate is None:
        return None
    evaluate = spec.evaluate
    parsed = Objective.parse(evaluate.objective_terms(), evaluate.objective_normalize())
    return parsed.against(references)


def usable_cores() -> int:
    """The cores this process may run on (`OMP_NUM_THREADS`, if set, says how many to use)."""
    told = os.environ.get("OMP_NUM_THREADS", "")
    if told.isdigit() and int(told) > 0:
        return int(told)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
