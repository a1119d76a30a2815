"""The typed messages between driver and workers: what goes out (`MergeTask`, `WorkerConfig`)
and what comes back (`MergeResult`, `Status`). Small and dependency-free, so that a worker process
never imports the planner.

Example:
    >>> task = MergeTask("0123456789abcdef", ("math", "code"), (0.5, 0.5), "linear", {}, 0, 7,
    ...                  "float32")
    >>> task.to_json()["adapters"]
    ['math', 'code']
    >>> MergeResult.failure(task, worker=0, error="boom").status is Status.FAILED
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """A merge's outcome, as written in merge.json and the manifest."""

    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    """Scored on part of the eval sets and stopped there: a race or a pruner found it behind
    (nothing of it is written; its manifest line holds the partial metrics)."""


OPTIONAL = ("trial", "search_params", "keep_threshold")


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
    """dtype the merged adapter is written in (merge.json's compute_dtype says what the
    arithmetic ran in)."""
    trial: int | None = None
    """The search trial that proposed this merge (None for grid merges)."""
    search_params: dict[str, Any] | None = None
    """The values the search's sampler chose for it."""
    keep_threshold: float | None = None
    """keep top-k: write the adapter's files only if its objective beats this (the current k-th
    best); None: always write them."""
    seen: SeenScores | None = None
    """A race's survivor: its scores on the examples the race saw; only the rest is scored."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self) | {"adapters": list(self.adapters), "weights": list(self.weights)}
        data.pop("seen")
        return {k: v for k, v in data.items() if v is not None or k not in OPTIONAL}


@dataclass(frozen=True)
class EvalConfig:
    """What a worker scores each merge on (resolved locations, validated by the plan)."""

    datasets: dict[str, dict[str, Any]]
    """Eval set name -> {"uri": ..., "kind": text | choice | generate, kind options...}."""
    max_samples: int = 64
    batch_size: int = 8
    max_length: int = 128
    adapters_per_pass: int = 1
    lm_eval: dict[str, Any] | None = None
    objective: list[dict[str, Any]] | None = None
    """The objective's terms (keep top-k decides by it on the worker)."""
    normalize: str = "none"
    """How the objective's terms are scaled (`Objective.parse`)."""


@dataclass(frozen=True)
class Window:
    """A slice of every eval set in one fixed, seeded order of its examples: positions
    [start, stop) of that order (clipped to each set's size). A race's rounds score growing
    prefixes of the order, one window each."""

    seed: int
    start: int
    stop: int


@dataclass(frozen=True)
class SeenScores:
    """What a race scored of a merge: per eval set, its per-example scores on positions
    [0, rest.start) of the race's order; `rest` is the window still to score (to each set's
    end), after which its metrics are those of every example."""

    rest: Window
    examples: dict[str, dict[str, list]]


@dataclass(frozen=True)
class WindowScores:
    """What a worker reports for one merge scored on a window: per eval set, its metrics and
    per-example scores there (in the window's order), or the error that stopped it."""

    merge_id: str
    metrics: dict[str, dict[str, Any]] | None = None
    examples: dict[str, dict[str, list]] | None = None
    error: str | None = None
    seconds: float = 0.0
    fatal: bool = False
    """Not scored because the worker's output failed fatally (it makes nothing more)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, built once by the plan and shipped to each worker."""

    base_model: str
    """Resolved base model location (absolute path or URI), or a hub id."""
    adapter_uris: dict[str, str]
    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    task_type: str | None = None
    num_threads: int = 1
    torch_dtype: str = "auto"
    gpu_headroom_gb: float = 2.0
    gpus: float = 0
    """GPUs Ray reserves for the worker (the spec's gpus_per_worker): with none it computes on
    the CPU, even on a GPU node; a fraction below 1 shares one card."""
    adapter_cache_bytes: int | None = None
    engine: str = "fast"
    evaluate: EvalConfig | None = None
    write_queue_bytes: int = 2**30
    """Merged adapters a worker holds waiting to be written (always at least one): a slower
    store makes the merging wait rather than fill memory."""
    writers: int = 2
    """Merges a worker writes at once (threads: hashing and file I/O release the GIL)."""
    upload_part_bytes: int = 16 * 2**20
    """S3 multipart part size for large files (files under two parts go in one PUT)."""
    upload_concurrency: int = 8
    """Parts of one file uploaded at once."""


@dataclass(frozen=True)
class MergeResult:
    """What a worker reports for one task. `record` is merge.json's content when done."""

    merge_id: str
    status: Status
    worker: int | None
    adapter_loads: int = 0
    load_seconds: float = 0.0
    seconds: float = 0.0
    cached: tuple[str, ...] = ()
    """Adapters the worker holds after this task (the scheduler's locality hint)."""
    record: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = False
    """The failure was transient (storage unreachable): the task may run again."""
    fatal: bool = False
    """The failure will hit every merge (output unwritable, disk full): stop the sweep."""
    peak_rss_mb: float = 0.0
    """The worker process's peak resident memory so far."""
    eval_seconds: float = 0.0
    """Its share of the scoring pass it was in (part of `seconds`)."""
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (load, arithmetic, eval, serialise, copy_to_host, hash, write, commit);
    `seconds` is their sum, the work done for it (not time spent waiting in the write queue)."""

    @classmethod
    def failure(cls, task: MergeTask, *, worker: int | None, error: str, **extra) -> MergeResult:
        return cls(task.merge_id, Status.FAILED, worker, error=error, **extra)

    @property
    def done(self) -> bool:
        return self.status is Status.DONE
