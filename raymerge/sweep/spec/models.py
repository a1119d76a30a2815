"""The sweep spec's top-level model, SweepSpec, and its grid groups (`combinations`).

Its sections live beside it: `methods` entries in spec_methods, `evaluate` in spec_evaluate,
`search` in spec_search, `tracking` in spec_tracking. YAML in is spec_loader's job.

Example:
    >>> spec = SweepSpec.model_validate({
    ...     "base_model": "./base", "adapters": {"a": "./a", "b": "./b"}, "output": "./out",
    ...     "combinations": [{"adapters": ["a", "b"], "weights": [[0.5, 0.5]],
    ...                       "methods": [{"combination_type": "linear"}]}]})
    >>> spec.workers
    1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from raymerge.sweep.spec.evaluate import EvaluateSpec
from raymerge.sweep.spec.methods import MethodSpec
from raymerge.sweep.spec.search import SearchSpec
from raymerge.sweep.spec.tracking import TrackingSpec
from raymerge.sweep.spec.types import FLOAT32_MAX, SINGLE_ADAPTER_HINT, AdapterName, FrozenModel

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


class _Group(FrozenModel):
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


class KeepSpec(FrozenModel):
    """Keep the adapter files of the best merges only (every merge keeps its merge.json)."""

    top: int = Field(ge=1)
    """How many merges, best by the objective, keep their files."""


class WritesSpec(FrozenModel):
    """How each worker writes its merges: in writer threads beside the merging, through a queue
    of bounded size, large files to S3 as concurrent multipart uploads."""

    queue_gb: float = Field(default=1.0, gt=0)
    """Merged adapters a worker holds waiting to be written (always at least one): a slower
    store makes merging wait instead of filling memory."""
    writers: int = Field(default=2, ge=1, le=32)
    """Merges a worker writes at once."""
    part_mb: float = Field(default=16, ge=5, le=5120)
    """S3 multipart part size (S3 allows 5 MiB to 5 GiB); files under two parts go in one PUT."""
    upload_concurrency: int = Field(default=8, ge=1, le=64)
    """Parts of one file uploaded at once."""


class SweepSpec(FrozenModel):
    """A whole sweep: which adapters to merge how, where the results go, and on how many workers."""

    base_model: str = Field(min_length=1)
    """Base model: local path, file://, s3://, hf://ORG/NAME[@REVISION][/SUBFOLDER] on the
    Hugging Face Hub (pinned to its commit), or a bare hub id (passed to from_pretrained)."""
    adapters: dict[AdapterName, str] = Field(min_length=1)
    """Adapter name -> location (local path, file://, s3:// or hf://ORG/NAME[@REVISION]
    [/SUBFOLDER]) of a PEFT LoRA adapter folder."""
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
    cpus_per_worker: float | None = Field(default=None, gt=0)
    """CPUs per worker: reserved on Ray (default 1), and the worker's threads. A run in this
    process without it uses every core the process may use (`OMP_NUM_THREADS` if set)."""

    @property
    def reserved_cpus(self) -> float:
        """The CPUs a Ray worker reserves."""
        return 1 if self.cpus_per_worker is None else self.cpus_per_worker

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
    tracking: TrackingSpec | None = None
    """Optional: log the sweep to MLflow (also on where MLFLOW_TRACKING_URI is set)."""
    writes: WritesSpec = Field(default_factory=WritesSpec)
    """How workers write merges (queue size, writer threads, S3 part size and concurrency)."""
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
    """Dotted paths of the keys in `options` (nested dicts too) that name a credential."""
    if isinstance(options, dict):
        for key, value in options.items():
            path = f"{prefix}{key}"
            if str(key).lower() in CREDENTIAL_KEYS:
                yield path
            yield from _credential_keys(value, f"{path}.")
