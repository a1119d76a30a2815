"""What a run reports: progress while it runs (`Progress`, drawn by the CLI), and its figures at
the end (`RunSummary`, also written to `<output>/summary.json`).

Example:
    >>> summary = RunSummary(output="out", total=3, workers={"0": WorkerStats(done=2)})
    >>> summary.done, summary.to_json()["done"]
    (2, 2)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from raymerge.store import manifest, storage
from raymerge.sweep.plan import Plan
from raymerge.task import MergeResult

MAX_FAILURES_IN_SUMMARY = 100


class Progress(Protocol):
    """What the driver reports while it runs (the CLI draws it; tests may record it)."""

    def start(self, total: int, skipped: int) -> None: ...

    def advance(self, result: MergeResult) -> None: ...


@dataclass
class WorkerStats:
    """One worker's share of the run."""

    done: int = 0
    failed: int = 0
    adapter_loads: int = 0
    bytes_written: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    peak_rss_mb: float = 0.0
    eval_seconds: float = 0.0
    """Of busy_seconds, the time spent scoring merges."""
    node: str = ""
    """The Ray node it ran on (when it started)."""
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage over its merges (load, arithmetic, eval, serialise, copy_to_host, hash,
    write, commit): the stages overlap (writes run beside the merging), so the slowest one,
    not their sum, bounds its pace."""

    def add(self, result: MergeResult) -> None:
        """Count one result's work (done and failed are counted by the dispatcher)."""
        self.adapter_loads += result.adapter_loads
        self.busy_seconds = round(self.busy_seconds + result.seconds, 3)
        self.peak_rss_mb = max(self.peak_rss_mb, result.peak_rss_mb)
        self.eval_seconds = round(self.eval_seconds + result.eval_seconds, 3)
        for stage, seconds in result.stages.items():
            self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 6)


@dataclass
class RunSummary:
    """The figures of one run, also written to `<output>/summary.json`. Totals of what workers
    did (done, adapter loads, bytes) are derived from the per-worker figures."""

    output: str
    total: int
    skipped: int = 0
    failed: int = 0
    not_run: int = 0
    """Tasks left undone: --fail-fast stopped the run, the output became unwritable, or every
    worker died."""
    retries: int = 0
    """Tasks run again because their worker died or the store was unreachable."""
    seconds: float = 0.0
    """Wall time of the run, Ray start and model loading included."""
    merge_seconds: float = 0.0
    """Time from the first task dispatched to the last result (workers loaded)."""
    merges_per_s: float = 0.0
    """Merges done per second of `merge_seconds`."""
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    """The first failures (merge_id and error); all of them are in the manifest."""
    stopped_by: str | None = None
    """Why dispatching stopped early (a fatal storage error), if it did."""
    executor: str = ""
    """Where the workers ran: "ray" (actors) or "in-process" (one worker, no Ray)."""
    stopped: int = 0
    """Merges a race or a search's pruner stopped after part of the examples (not written)."""
    examples_scored: int = 0
    """Example scorings this run (one example of one eval set, for one merge): race rounds,
    pruned trials' rounds and full scorings together."""
    examples_if_full: int = 0
    """What scoring each of this run's merges on every example would have cost."""
    race: list[dict[str, Any]] = field(default_factory=list)
    """The race's rounds: prefix, candidates, examples scored (and reused), stopped."""

    def count_scoring(self, scored: int, full: int = 0) -> None:
        """Scoring work done (`scored`) and, once per merge, what its full scoring costs."""
        self.examples_scored += scored
        self.examples_if_full += full

    @property
    def done(self) -> int:
        return sum(w.done for w in self.workers.values())

    @property
    def adapter_loads(self) -> int:
        return sum(w.adapter_loads for w in self.workers.values())

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.workers.values())

    @property
    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage over every worker's merges, slowest first."""
        totals: dict[str, float] = {}
        for worker in self.workers.values():
            for stage, seconds in worker.stages.items():
                totals[stage] = totals.get(stage, 0.0) + seconds
        return {k: round(v, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            done=self.done,
            adapter_loads=self.adapter_loads,
            bytes_written=self.bytes_written,
            stage_seconds=self.stage_seconds,
        )
        if self.examples_if_full:
            data["examples_fraction"] = round(self.examples_scored / self.examples_if_full, 4)
        return data

    def add_failure(self, merge_id: str, error: str) -> None:
        """Count a failed merge; the first MAX_FAILURES_IN_SUMMARY are listed."""
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_IN_SUMMARY:
            self.failures.append({"merge_id": merge_id, "error": error})


def write_summary(plan: Plan, summary: RunSummary, started: float) -> None:
    """Settle the run's timings (`started`: its time.perf_counter() at the start) and write
    summary.json, if the store lets us."""
    summary.seconds = round(time.perf_counter() - started, 3)
    if summary.merge_seconds:
        summary.merges_per_s = round(summary.done / summary.merge_seconds, 3)
    with contextlib.suppress(*storage.errors()):  # the figures are also returned and printed
        manifest.write_summary(plan.output, summary.to_json(), plan.spec.storage_options)
