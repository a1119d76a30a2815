"""The sweep spec: pydantic models, and YAML in. Nothing else lives here.

Example:
    >>> spec = SweepSpec.model_validate({
    ...     "base_model": "./base", "adapters": {"a": "./a", "b": "./b"}, "output": "./out",
    ...     "combinations": [{"adapters": ["a", "b"], "weights": [[0.5, 0.5]],
    ...                       "methods": [{"combination_type": "linear"}]}]})
    >>> spec.workers
    1
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from raymerge.errors import SpecError
from raymerge.merge.registry import METHODS, PARAMS, SIGN_METHODS, Param

T = TypeVar("T")

AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
"""An adapter's name in the spec: letters, digits, `.`, `_` and `-`."""

SINGLE_ADAPTER_HINT = (
    "a merge needs at least 2 adapters (PEFT silently turns a one-adapter merge into `linear`)"
)

# Keys that would put a credential into the spec (and so into job specs and logs). Credentials
# come from the standard AWS chain instead: env vars, ~/.aws, instance or pod identity.
CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
    }
)


def _as_grid(value: Any) -> Any:
    """A scalar is a one-value grid: `density: 0.5` means `density: [0.5]`."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    return [value]


Grid = Annotated[list[T] | None, BeforeValidator(_as_grid)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class _MethodBase(_Frozen):
    """One entry of a group's `methods`: a combination type and its parameters.

    Any parameter given as a list is a grid: one merge per value, cartesian over all lists. The
    parameters, their checks and defaults come from the method registry (raymerge.merge.registry).
    """

    combination_type: Grid[str]
    """Combination type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, ..."""

    @field_validator("*")
    @classmethod
    def _grid_not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("empty list: give a value, or a list of values to sweep over")
        return value

    @field_validator("combination_type")
    @classmethod
    def _known_type(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in METHODS:
                raise ValueError(
                    f"unknown combination type {name!r}; use one of: {', '.join(METHODS)}"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"{value} lists a combination type twice")
        return value

    @model_validator(mode="after")
    def _params_fit_types(self) -> _MethodBase:
        methods = [METHODS[name] for name in self.combination_type or []]
        for param in PARAMS:
            if getattr(self, param) is not None and not any(m.takes(param) for m in methods):
                names = ", ".join(m.name for m in methods)
                raise ValueError(f"{param} does not apply to combination type {names}; remove it")
        for param in dict.fromkeys(p for m in methods for p in m.required()):
            if getattr(self, param) is None:
                needing = ", ".join(m.name for m in methods if param in m.required())
                raise ValueError(
                    f"{param} is required for {needing}: add e.g. `{param}: 0.5` "
                    f"({PARAMS[param].doc.rstrip('.').lower()})"
                )
        return self

    def expand(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (combination_type, params) this entry stands for, defaults filled in."""
        for combination_type in self.combination_type or []:
            defaults = METHODS[combination_type].defaults()
            grids = {p: getattr(self, p) or [defaults[p]] for p in defaults}
            for values in itertools.product(*grids.values()):
                yield combination_type, dict(zip(grids, values, strict=True))

    def count(self) -> int:
        """How many (combination_type, params) pairs `expand` yields."""
        return sum(1 for _ in self.expand())


def _param_check(param: Param):
    def check(cls, value: list | None) -> list | None:
        for item in value or []:
            problem = param.check(item)
            if problem:
                raise ValueError(problem)
        return value

    return field_validator(param.name)(classmethod(check))


MethodSpec = create_model(
    "MethodSpec",
    __base__=_MethodBase,
    __doc__=_MethodBase.__doc__,
    __validators__={f"_check_{p.name}": _param_check(p) for p in PARAMS.values()},
    **{
        p.name: (Grid[Literal[SIGN_METHODS] if p.name == "majority_sign_method" else p.kind],
                 Field(default=None, description=p.doc))
        for p in PARAMS.values()
    },
)  # fmt: skip
"""A `methods` entry, with one optional field per registry parameter."""


FLOAT32_MAX = 3.4028234663852886e38
"""The merge arithmetic is float32: a weight beyond this is infinite there."""


class _Group(_Frozen):
    weights: list[list[float]] = Field(min_length=1)
    """Weight vectors, one merge each; each has one weight per adapter in the merge, in order."""
    methods: list[MethodSpec] = Field(min_length=1)
    """Combination types (and parameter grids) applied to every adapter set of the group."""

    @field_validator("weights")
    @classmethod
    def _weights_in_range(cls, value: list[list[float]]) -> list[list[float]]:
        for i, vector in enumerate(value):
            for j, weight in enumerate(vector):
                if abs(weight) > FLOAT32_MAX:
                    raise ValueError(
                        f"weights[{i}][{j}] = {weight:g} overflows float32 (largest "
                        f"{FLOAT32_MAX:.3g}), in which merges are computed; use a smaller weight"
                    )
        return value


class ExplicitGroup(_Group):
    """An explicit adapter set: `adapters: [math, code]`."""

    adapters: list[AdapterName]
    """The adapters merged together, by name (at least 2)."""

    @field_validator("adapters")
    @classmethod
    def _at_least_two(cls, value: list[str]) -> list[str]:
        if len(value) < 2:
            raise ValueError(f"{value} has {len(value)} adapter(s); {SINGLE_ADAPTER_HINT}")
        return value


class ChooseGroup(_Group):
    """Every k-subset of `from` (default: all adapters): `choose: 2`."""

    model_config = ConfigDict(populate_by_name=True)

    choose: int
    """Size of each subset (at least 2)."""
    from_: list[AdapterName] | None = Field(default=None, alias="from")
    """Adapters to choose from, by name (default: all of the spec's adapters)."""

    @field_validator("choose")
    @classmethod
    def _at_least_two(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"{value} is too small; {SINGLE_ADAPTER_HINT}")
        return value


def _group_kind(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "choose" if isinstance(value, ChooseGroup) else "explicit"
    return "choose" if isinstance(value, dict) and "choose" in value else "explicit"


Group = Annotated[
    Annotated[ExplicitGroup, Tag("explicit")] | Annotated[ChooseGroup, Tag("choose")],
    Discriminator(_group_kind),
]


class EvalSetSpec(_Frozen):
    """One eval set: a JSONL file and what kind of examples it holds."""

    path: str = Field(min_length=1)
    """Location of the JSONL file (local path, file:// or s3://)."""
    kind: Literal["text", "choice", "generate"] = "text"
    """text: {"text"} -> loss; choice: {"prompt", "choices", "answer"} -> accuracy;
    generate: {"prompt", "answer"} -> exact match of the greedy continuation."""
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    """generate: tokens generated at most."""
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    """generate: the continuation ends at the first of these."""
    ignore_case: bool = False
    """generate: compare answers without regard to case."""


class ObjectiveTerm(_Frozen):
    metric: str = Field(min_length=1)
    """SET.METRIC (e.g. qa.accuracy), an lm-eval TASK.METRIC, or mean_loss."""
    weight: float = 1.0
    direction: Literal["minimize", "maximize"] | None = None
    """Default: minimize losses and perplexities, maximize the rest."""


class LmEvalSpec(_Frozen):
    """lm-evaluation-harness tasks, run on the held model with each merge active
    (`pip install raymerge[lm-eval]`)."""

    tasks: list[str] = Field(min_length=1)
    num_fewshot: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)
    """Examples per task (default: all)."""
    include_path: str | None = None
    """A folder of task YAMLs (your own tasks, over local data files)."""
    batch_size: int = Field(default=8, ge=1)


class EvaluateSpec(_Frozen):
    """Score every merge on small eval sets with the held base model."""

    datasets: dict[AdapterName, str | EvalSetSpec] = Field(default_factory=dict)
    """Eval set name -> a JSONL location (a text set), or {path, kind, ...}."""
    max_samples: int = Field(default=64, ge=1)
    """Examples scored per eval set."""
    batch_size: int = Field(default=8, ge=1)
    """Examples per forward pass (times adapters_per_pass rows)."""
    max_length: int = Field(default=128, ge=2)
    """Tokens per example (longer ones are truncated)."""
    adapters_per_pass: int = Field(default=1, ge=1, le=64)
    """Merges scored together through PEFT's mixed-adapter batches (one base pass for all)."""
    objective: Annotated[list[str | ObjectiveTerm], BeforeValidator(_as_grid)] | None = None
    """What "best" means: a metric, or a list of them (weighted sum); default: mean_loss over
    the text sets, else the first set's main metric."""
    lm_eval: LmEvalSpec | None = None

    @model_validator(mode="after")
    def _something_to_score(self) -> EvaluateSpec:
        if not self.datasets and self.lm_eval is None:
            raise ValueError("give `datasets`, `lm_eval`, or both")
        if self.lm_eval:
            clash = sorted(set(self.lm_eval.tasks) & set(self.datasets))
            if clash:
                raise ValueError(f"{', '.join(clash)} names both a dataset and an lm_eval task")
        return self

    def sets(self) -> dict[str, EvalSetSpec]:
        """Every dataset as an EvalSetSpec (a bare location is a text set)."""
        return {
            name: EvalSetSpec(path=value) if isinstance(value, str) else value
            for name, value in self.datasets.items()
        }

    def objective_terms(self) -> list[dict[str, Any]]:
        """The objective as plain terms, the default filled in."""
        if self.objective:
            return [
                {"metric": t} if isinstance(t, str) else t.model_dump(exclude_none=True)
                for t in self.objective
            ]
        sets = self.sets()
        if any(s.kind == "text" for s in sets.values()):
            return [{"metric": "mean_loss"}]
        if sets:
            name, first = next(iter(sets.items()))
            primary = {"choice": "accuracy", "generate": "exact_match"}[first.kind]
            return [{"metric": f"{name}.{primary}"}]
        return [{"metric": f"{self.lm_eval.tasks[0]}.acc"}]


class Range(_Frozen):
    """A range to search: `{low: 0.1, high: 0.9}` (`log: true` samples on a log scale)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low:g} must be below high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if max(abs(self.low), abs(self.high)) > FLOAT32_MAX:
            raise ValueError("the range overflows float32, in which merges are computed")
        return self


SearchParam = Range | list[Any] | float | int | bool | str
"""A method parameter in a search: a range, a list of choices, or one value."""


class SearchMethodSpec(_Frozen):
    """Combination types a search may pick, and each parameter's range or choices."""

    model_config = ConfigDict(frozen=True, extra="allow")

    combination_type: Grid[str]

    @model_validator(mode="after")
    def _params(self) -> SearchMethodSpec:
        for name in self.combination_type or []:
            if name not in METHODS:
                raise ValueError(
                    f"unknown combination type {name!r}; use one of: {', '.join(METHODS)}"
                )
        methods = [METHODS[n] for n in self.combination_type]
        for param, value in self.params().items():
            if param not in PARAMS:
                raise ValueError(f"{param}: unknown parameter; they are: {', '.join(PARAMS)}")
            if not any(m.takes(param) for m in methods):
                names = ", ".join(m.name for m in methods)
                raise ValueError(f"{param} does not apply to combination type {names}; remove it")
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not value:
                raise ValueError(f"{param}: an empty list of choices")
            for item in values:
                probes = [item.low, item.high] if isinstance(item, Range) else [item]
                for probe in probes:
                    problem = PARAMS[param].check(probe)
                    if problem:
                        raise ValueError(problem)
        for method in methods:
            for required in method.required():
                if required not in self.params():
                    raise ValueError(
                        f"{required} is required for {method.name}: give a range "
                        f"({{low: 0.2, high: 0.8}}), choices or a value"
                    )
        return self

    def params(self) -> dict[str, Any]:
        """The parameters given (ranges as Range), by name."""
        out = {}
        for name, value in (self.model_extra or {}).items():
            if isinstance(value, dict):
                value = Range.model_validate(value)
            out[name] = value
        return out


class SearchSpec(_Frozen):
    """An adaptive search over merges, asked of Optuna and evaluated on the worker pool."""

    model_config = ConfigDict(populate_by_name=True)

    adapters: list[AdapterName] | None = None
    """A fixed set of adapters to merge (at least 2)..."""
    choose: int | None = None
    """...or subsets of this size of `from` (default: all of the spec's adapters)."""
    from_: list[AdapterName] | None = Field(default=None, alias="from")
    weights: Range | dict[AdapterName, Range] = Field(default_factory=lambda: Range(low=0, high=1))
    """Each weight's range: one for all, or one per adapter."""
    methods: list[SearchMethodSpec] = Field(min_length=1)
    objectives: Annotated[list[str | ObjectiveTerm], BeforeValidator(_as_grid)] | None = None
    """Several metrics for a Pareto search (default: evaluate.objective, one value)."""
    budget: int = Field(ge=1, le=1_000_000)
    """Evaluations in all (a rerun continues up to it)."""
    sampler: Literal["tpe", "cmaes", "nsga2", "random", "qmc"] | None = None
    """Default: tpe for one objective, nsga2 for several."""
    seed: int = 0

    @model_validator(mode="after")
    def _shape(self) -> SearchSpec:
        if (self.adapters is None) == (self.choose is None):
            raise ValueError("give either `adapters` (a fixed set) or `choose: k`")
        if self.adapters is not None and len(self.adapters) < 2:
            raise ValueError(f"adapters: {SINGLE_ADAPTER_HINT}")
        if self.choose is not None and self.choose < 2:
            raise ValueError(f"choose: {self.choose} is too small; {SINGLE_ADAPTER_HINT}")
        several = self.objectives is not None and len(self.objectives) > 1
        if several and self.sampler in ("tpe", "cmaes", "qmc"):
            raise ValueError(
                f"sampler {self.sampler} optimises one objective; use nsga2 (or random) for "
                "several objectives"
            )
        if not several and self.sampler == "nsga2":
            raise ValueError("sampler nsga2 is for several objectives; use tpe or cmaes")
        return self

    def sampler_name(self) -> str:
        several = self.objectives is not None and len(self.objectives) > 1
        return self.sampler or ("nsga2" if several else "tpe")


class KeepSpec(_Frozen):
    """Keep the adapter files of the best merges only (every merge keeps its merge.json)."""

    top: int = Field(ge=1)
    """How many merges, best by the objective, keep their files."""


class SweepSpec(_Frozen):
    """A whole sweep: which adapters to merge how, where the results go, and on how many workers."""

    base_model: str = Field(min_length=1)
    """Base model: local path, file://, s3:// or a hub id."""
    adapters: dict[AdapterName, str] = Field(min_length=1)
    """Adapter name -> location (local path, file:// or s3://) of a PEFT LoRA adapter folder."""
    combinations: list[Group] = Field(default_factory=list)
    """Groups of merges; the plan is their union."""
    search: SearchSpec | None = None
    """An adaptive search (instead of, or after, `combinations`)."""
    keep: KeepSpec | None = None
    """Keep only the best merges' adapter files (needs `evaluate`; default: keep all)."""
    output: str = Field(min_length=1)
    """Where merges are written: local path, file:// or s3://."""
    workers: int = Field(default=1, ge=1)
    """Number of merge workers (Ray actors), each holding the base model once."""
    gpus_per_worker: float = Field(default=0, ge=0)
    """GPUs per worker; the base model is sharded over them (0: run on CPU)."""
    cpus_per_worker: float = Field(default=1, gt=0)
    """CPUs reserved per worker."""
    engine: Literal["fast", "peft"] = "fast"
    """fast: merges computed straight from the adapters' tensors (PEFT's path where it cannot);
    peft: every merge through PeftModel.add_weighted_adapter."""
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """dtype the base model is loaded in on the workers (auto: the checkpoint's)."""
    gpu_headroom_gb: float = Field(default=2.0, ge=0)
    """GPU memory per GPU kept free of base-model weights, for adapters and merge buffers."""
    adapter_cache_gb: float | None = Field(default=None, gt=0)
    """Bytes of input adapters each worker keeps loaded (LRU; default: no limit)."""
    scheduling: Literal["locality", "round_robin"] = "locality"
    """locality: workers get tasks whose adapters they hold; round_robin: task i to worker i%n."""
    task_retries: int = Field(default=2, ge=0)
    """Times a task is retried after its worker died (OOM, preemption, node loss)."""
    max_worker_restarts: int = Field(default=3, ge=0)
    """Times Ray restarts a worker that died."""
    seed: int = 0
    """Sweep seed; each merge's random seed (DARE) is derived from it and the merge's identity."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Options for fsspec/s3fs (e.g. client_kwargs.endpoint_url); never credentials."""
    allow_base_mismatch: bool = False
    """Allow merging adapters whose configs name different base models."""
    allow_pickle: bool = False
    """Accept adapters stored only as adapter_model.bin (a pickle; loaded with weights_only)."""
    evaluate: EvaluateSpec | None = None
    """Optional: score each merge (and, once, the base model and each input adapter)."""
    output_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """dtype of the merged adapters (default: the input adapters' dtype; float32 if they differ).
    The merge arithmetic itself is always float32."""

    @field_validator("adapters")
    @classmethod
    def _names_are_not_paths(cls, value: dict[str, str]) -> dict[str, str]:
        for name, location in value.items():
            if set(name) <= {"."}:
                raise ValueError(f"adapter name {name!r} must contain a letter or digit")
            if not location.strip():
                raise ValueError(f"adapter {name!r} has a blank location; give its folder")
        return value

    @field_validator("output", "base_model")
    @classmethod
    def _not_blank(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name} is blank; give a local path, file:// or s3:// URI")
        return value

    @model_validator(mode="after")
    def _work_to_do(self) -> SweepSpec:
        if not self.combinations and self.search is None:
            raise ValueError("give `combinations` (a grid), `search`, or both")
        if self.search is not None and self.evaluate is None:
            raise ValueError("search: a search needs `evaluate` (its objective scores merges)")
        if self.keep is not None and self.evaluate is None:
            raise ValueError("keep: keeping the best merges needs `evaluate` to rank them")
        return self

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = sorted(_credential_keys(value))
        if found:
            raise ValueError(
                f"{', '.join(found)} would put a credential in the spec; remove it and use the "
                "standard AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, ~/.aws/credentials, or the pod's or instance's role)"
            )
        return value


def _credential_keys(options: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            path = f"{prefix}{key}"
            if str(key).lower() in CREDENTIAL_KEYS:
                yield path
            yield from _credential_keys(value, f"{path}.")


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a YAML sweep spec; `overrides` (from the CLI) replace top-level keys.

    Raises SpecError listing every problem found, each naming its key and value.
    """
    raw = read_spec_file(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_spec(raw)


MAX_SPEC_BYTES = 16 * 2**20
"""A spec file larger than this is refused unread."""
MAX_SPEC_VALUES = 200_000
"""Values a spec may stand for once YAML aliases are expanded (an alias bomb stands for
billions): far above any real sweep's spec, far below what validation could walk in a second."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML allows them: the last one would win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec file's YAML mapping, unvalidated; SpecError if it is missing, too large, not a
    YAML mapping, has a duplicate key, or stands for more than MAX_SPEC_VALUES values once its
    aliases are expanded. Errors name lines and keys, never echo the file's text."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES >> 20} MB; is it a spec?")
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec file {path} cannot be read: {type(exc).__name__}") from None
    try:
        raw = yaml.load(text, Loader=_SpecLoader)
    except _DuplicateKey as exc:
        raise SpecError(
            f"{path}: {exc}; each key may appear once in a mapping: remove or rename one"
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {type(exc).__name__}") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a spec") from None
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: the spec must be a YAML mapping of keys (base_model, adapters, …)"
        )
    _check_expanded_size(raw, path)
    return raw


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's message without its snippet of the file (the line may hold a pasted secret)."""
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({exc.context})" if exc.context else ""
    return f"{where}{exc.problem or 'syntax error'}{context}"


def _check_expanded_size(raw: Any, path: Path) -> None:
    """Refuse alias bombs and recursive aliases: count what the document stands for, each shared
    node once (memoised), so that counting itself stays linear in the file."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, list | dict):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise SpecError(f"{path}: a YAML alias refers to itself (a recursive structure)")
        active.add(key)
        children = value.values() if isinstance(value, dict) else value
        total = 1 + sum(size(child) for child in children)
        active.discard(key)
        sizes[key] = total
        if total > MAX_SPEC_VALUES:
            raise SpecError(
                f"{path}: the spec stands for more than {MAX_SPEC_VALUES:,} values once its YAML "
                "aliases (*name) are expanded; write it without such nested aliases"
            )
        return total

    try:
        size(raw)
    except RecursionError:
        raise SpecError(f"{path}: the YAML is nested too deeply to be a spec") from None


def parse_spec(raw: dict[str, Any]) -> SweepSpec:
    """Validate a spec given as a dict; raises SpecError listing every problem."""
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([_describe(error) for error in exc.errors()]) from None


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as `combinations[0].methods[1].density: <message> (got <value>)`."""
    key = ""
    loc = list(error["loc"])
    if (
        "[key]" in loc
    ):  # pydantic's marker for a bad dict key (only `adapters` has constrained keys)
        return f"{loc[0]}: name {error['input']!r} may only use letters, digits, '.', '_' and '-'"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            key += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and part in ("explicit", "choose"):
            continue  # the discriminator's tag, not a key the user wrote
        else:
            key += f".{part}" if key else str(part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; check its spelling (see README for the spec's keys)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if key.startswith("storage_options") or "got " in message or error["type"] == "value_error":
        return f"{key}: {message}"  # never echo storage_options values: they may hold secrets
    return f"{key}: {message} (got {error.get('input')!r})"
