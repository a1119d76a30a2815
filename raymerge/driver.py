"""The driver: connects to Ray, starts merge workers, feeds them tasks as they free up, and keeps
the manifest and summary. It knows nothing of the merge math.

Example:
    >>> summary = run_sweep(load_plan("jobs/demo.yaml"))  # doctest: +SKIP
    >>> summary.done, summary.failed  # doctest: +SKIP
    (24, 0)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raymerge import manifest
from raymerge.errors import ClusterError
from raymerge.plan import MergeTask, Plan
from raymerge.worker import MergeWorker

TASKS_IN_FLIGHT_PER_WORKER = 2  # one merging, one queued: no idle gap between tasks
MANIFEST_FLUSH_SECONDS = 30.0


class Progress(Protocol):
    """What the driver reports while it runs (the CLI draws it; tests may record it)."""

    def start(self, total: int, skipped: int) -> None: ...

    def advance(self, result: dict[str, Any]) -> None: ...


@dataclass
class RunSummary:
    """The figures of one run, also written to `<output>/summary.json`."""

    output: str
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    """Wall time of the run, Ray start and model loading included."""
    merge_seconds: float = 0.0
    """Time from the first task dispatched to the last result (workers loaded)."""
    merges_per_s: float = 0.0
    """Merges done per second of `merge_seconds`."""
    adapter_loads: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_sweep(
    plan: Plan,
    *,
    address: str | None = None,
    progress: Progress | None = None,
    start_timeout: float = 600.0,
) -> RunSummary:
    """Run every merge of `plan` that is not committed yet; returns the run's summary.

    Uses the Ray instance this process is connected to, else `address`, else RAY_ADDRESS, else
    starts a local one. Merges already committed under the output (merge.json present) are
    skipped, so rerunning a spec resumes it.
    """
    started = time.perf_counter()
    options = plan.spec.storage_options
    committed = manifest.committed_merge_ids(plan.output, options)
    total = skipped = 0
    for task in plan.tasks():
        total += 1
        skipped += task.merge_id in committed
    summary = RunSummary(output=plan.output, total=total, skipped=skipped)
    if progress:
        progress.start(total - skipped, skipped)

    writer = manifest.ManifestWriter(plan.output, options)
    _carry_over_committed(plan, committed, writer)
    pending = (task for task in plan.tasks() if task.merge_id not in committed)
    if total > skipped:
        with _ray_session(address) as fixed_size:
            workers = _start_workers(plan, start_timeout, fixed_size)
            dispatch_started = time.perf_counter()
            try:
                _dispatch(workers, pending, plan, writer, summary, progress)
            finally:
                summary.merge_seconds = round(time.perf_counter() - dispatch_started, 3)
                for worker in workers.values():
                    ray.kill(worker)
    writer.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    if summary.merge_seconds:
        summary.merges_per_s = round(summary.done / summary.merge_seconds, 3)
    manifest.write_summary(plan.output, summary.to_json(), options)
    return summary


def _carry_over_committed(plan: Plan, committed: set[str], writer: manifest.ManifestWriter) -> None:
    """Keep the manifest lines of merges done by earlier runs; rebuild any that went missing."""
    options = plan.spec.storage_options
    listed = set()
    for line in manifest.read_manifest(plan.output, options):
        merge_id = line.get("merge_id")
        if line.get("status") == "done" and merge_id in committed and merge_id not in listed:
            writer.add(line)
            listed.add(merge_id)
    missing = committed - listed  # committed after the last manifest flush of a killed run
    for record in manifest.read_records(plan.output, sorted(missing), options):
        writer.add(manifest.manifest_line(plan.output, record))


def _dispatch(
    workers: dict[int, Any],
    tasks: Iterator[MergeTask],
    plan: Plan,
    writer: manifest.ManifestWriter,
    summary: RunSummary,
    progress: Progress | None,
) -> None:
    """Pull-based: each worker gets its next task as soon as it finishes one."""
    uris = plan.adapter_uris()
    in_flight: dict[Any, tuple[int, MergeTask]] = {}

    def feed(index: int) -> None:
        task = next(tasks, None)
        if task is not None:
            in_flight[workers[index].merge.remote(task)] = (index, task)

    for index in workers:
        for _ in range(TASKS_IN_FLIGHT_PER_WORKER):
            feed(index)
    last_flush = time.monotonic()
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        index, task = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            workers.pop(index, None)
            result = {"merge_id": task.merge_id, "status": "failed", "error": _first_line(exc)}
        if result["status"] == "done":
            summary.done += 1
            writer.add(manifest.manifest_line(plan.output, result["record"]))
        else:
            summary.failed += 1
            summary.failures.append({"merge_id": task.merge_id, "error": result["error"]})
            writer.add(manifest.failure_line(task, uris, result["error"]))
        if progress:
            progress.advance(result)
        if index in workers:
            feed(index)
        elif not workers:
            _fail_rest(tasks, uris, writer, summary, "not run: every merge worker died")
        if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
            writer.flush()
            last_flush = time.monotonic()
    for index, worker in workers.items():
        summary.adapter_loads[str(index)] = ray.get(worker.stats.remote())["adapter_loads"]


def _fail_rest(tasks, uris, writer, summary: RunSummary, reason: str) -> None:
    for task in tasks:
        summary.failed += 1
        summary.failures.append({"merge_id": task.merge_id, "error": reason})
        writer.add(manifest.failure_line(task, uris, reason))


def _start_workers(plan: Plan, start_timeout: float, fixed_size: bool) -> dict[int, Any]:
    """Start `workers` actors and wait until each holds the base model."""
    spec = plan.spec
    if fixed_size:
        _check_resources(spec)
    first = next(iter(plan.adapters.values()))
    remote = ray.remote(MergeWorker).options(
        num_cpus=spec.cpus_per_worker,
        num_gpus=spec.gpus_per_worker,
        max_concurrency=1,
    )
    workers = {
        i: remote.remote(
            i,
            plan.base_model,
            plan.adapter_uris(),
            plan.output,
            spec.storage_options,
            task_type=first.task_type,
            num_threads=max(1, int(spec.cpus_per_worker)),
        )
        for i in range(spec.workers)
    }
    try:
        ray.get([w.info.remote() for w in workers.values()], timeout=start_timeout)
    except GetTimeoutError:
        for worker in workers.values():
            ray.kill(worker)
        raise ClusterError(
            f"the {spec.workers} merge workers did not all start within {start_timeout:.0f} s; "
            f"each needs {spec.cpus_per_worker} CPU and {spec.gpus_per_worker} GPU, and the "
            f"cluster has {_free_resources()} available; lower `workers` or "
            "`gpus_per_worker`, or add nodes"
        ) from None
    except RayActorError as exc:
        for worker in workers.values():
            ray.kill(worker)
        raise ClusterError(f"a merge worker failed to start: {_first_line(exc)}") from None
    return workers


def _check_resources(spec) -> None:
    """Fail fast when a cluster that cannot grow will never fit the workers."""
    total = ray.cluster_resources()
    need_gpus = spec.workers * spec.gpus_per_worker
    need_cpus = spec.workers * spec.cpus_per_worker
    if need_gpus > total.get("GPU", 0) or need_cpus > total.get("CPU", 0):
        raise ClusterError(
            f"workers={spec.workers} need {need_cpus:g} CPU and {need_gpus:g} GPU "
            f"(cpus_per_worker={spec.cpus_per_worker:g}, gpus_per_worker={spec.gpus_per_worker:g})"
            f" but this Ray instance has {total.get('CPU', 0):g} CPU and "
            f"{total.get('GPU', 0):g} GPU; lower them (gpus_per_worker: 0 runs on CPU) or use "
            "a cluster with more resources (--address)"
        )


def _free_resources() -> str:
    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU"


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[bool]:
    """Use the current Ray connection, else join `address`/RAY_ADDRESS, else start Ray locally.

    Yields whether the cluster is of fixed size (a local instance we started: no autoscaler).
    """
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {exc}"
        ) from None
    try:
        yield not address
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    cause = exc.__cause__ or getattr(exc, "cause", None)
    if cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return text.splitlines()[-1] if text else type(exc).__name__
