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
    field_validator,
    model_validator,
)

from raymerge.errors import SpecError
from raymerge.methods import COMBINATION_TYPES, METHOD_PARAMS, applies

T = TypeVar("T")

AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
"""An adapter's name in the spec: letters, digits, `.`, `_` and `-`."""

SINGLE_ADAPTER_HINT = (
    "a merge needs at least 2 adapters (PEFT silently turns a one-adapter merge into `linear`)"
)

SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")

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


class MethodSpec(_Frozen):
    """One entry of a group's `methods`: a combination type and its parameters (PEFT's names).

    Any parameter given as a list is a grid: one merge per value, cartesian over all lists.
    """

    combination_type: Grid[str]
    """PEFT combination type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, ..."""
    svd_rank: Grid[int] = None
    """Rank of the merged adapter for the *svd types (default: the largest input rank)."""
    svd_clamp: Grid[float] = None
    """Quantile in (0, 1] at which the SVD factors are clamped (default: no clamping)."""
    svd_full_matrices: Grid[bool] = None
    """Passed to torch.linalg.svd (default: true)."""
    svd_driver: Grid[str] = None
    """cuSOLVER driver for torch.linalg.svd on CUDA: gesvd, gesvdj or gesvda."""
    density: Grid[float] = None
    """Fraction of values kept, in (0, 1]; required by the ties, dare and magnitude_prune types."""
    majority_sign_method: Grid[Literal["total", "frequency"]] = None
    """TIES sign election: total (default) or frequency."""

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
            if name not in COMBINATION_TYPES:
                known = ", ".join(COMBINATION_TYPES)
                raise ValueError(f"unknown combination type {name!r}; use one of: {known}")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} lists a combination type twice")
        return value

    @field_validator("svd_rank")
    @classmethod
    def _rank_positive(cls, value: list[int] | None) -> list[int] | None:
        for rank in value or []:
            if rank < 1:
                raise ValueError(f"svd_rank {rank} must be at least 1")
        return value

    @field_validator("density", "svd_clamp")
    @classmethod
    def _unit_interval(cls, value: list[float] | None, info) -> list[float] | None:
        for x in value or []:
            if not 0 < x <= 1:
                raise ValueError(f"{info.field_name} {x} is outside (0, 1]; use e.g. 0.5")
        return value

    @field_validator("svd_driver")
    @classmethod
    def _known_driver(cls, value: list[str] | None) -> list[str] | None:
        for driver in value or []:
            if driver not in SVD_DRIVERS:
                raise ValueError(f"svd_driver {driver!r} is not one of {', '.join(SVD_DRIVERS)}")
        return value

    @model_validator(mode="after")
    def _params_fit_types(self) -> MethodSpec:
        infos = {name: COMBINATION_TYPES[name] for name in self.combination_type or []}
        for param in METHOD_PARAMS:
            if getattr(self, param) is not None and not any(
                applies(param, i) for i in infos.values()
            ):
                raise ValueError(
                    f"{param} does not apply to combination type {', '.join(infos)}; remove it"
                )
        needs_density = [name for name, info in infos.items() if info.prunes]
        if needs_density and self.density is None:
            raise ValueError(
                f"density is required for {', '.join(needs_density)}: "
                "add e.g. `density: 0.5` (the fraction of values kept, in (0, 1])"
            )
        return self

    def expand(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (combination_type, params) this entry stands for, defaults filled in."""
        for combination_type in self.combination_type or []:
            info = COMBINATION_TYPES[combination_type]
            defaults = info.defaults()
            grids = {p: getattr(self, p) or [defaults[p]] for p in defaults}
            for values in itertools.product(*grids.values()):
                yield combination_type, dict(zip(grids, values, strict=True))

    def count(self) -> int:
        """How many (combination_type, params) pairs `expand` yields."""
        return sum(1 for _ in self.expand())


class _Group(_Frozen):
    weights: list[list[float]] = Field(min_length=1)
    """Weight vectors, one merge each; each has one weight per adapter in the merge, in order."""
    methods: list[MethodSpec] = Field(min_length=1)
    """Combination types (and parameter grids) applied to every adapter set of the group."""


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


class EvaluateSpec(_Frozen):
    """Score every merge on small eval sets with the held base model."""

    datasets: dict[AdapterName, str] = Field(min_length=1)
    """Eval set name -> JSONL location (one {"text": ...} per line)."""
    max_samples: int = Field(default=64, ge=1)
    """Samples scored per eval set."""
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=128, ge=2)
    """Tokens per sample (longer ones are truncated)."""


class SweepSpec(_Frozen):
    """A whole sweep: which adapters to merge how, where the results go, and on how many workers."""

    base_model: str = Field(min_length=1)
    """Base model: local path, file://, s3:// or a hub id."""
    adapters: dict[AdapterName, str] = Field(min_length=1)
    """Adapter name -> location (local path, file:// or s3://) of a PEFT LoRA adapter folder."""
    combinations: list[Group] = Field(min_length=1)
    """Groups of merges; the plan is their union."""
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
        for name in value:
            if set(name) <= {"."}:
                raise ValueError(f"adapter name {name!r} must contain a letter or digit")
        return value

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


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec file's YAML mapping, unvalidated; SpecError if missing or not a YAML mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path} not found") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: the spec must be a YAML mapping of keys (base_model, adapters, …)"
        )
    return raw


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
