"""The driver: connects to Ray, starts merge workers, feeds them tasks as they free up, retries
tasks whose worker died, and keeps the manifest and summary. It knows nothing of the merge math.

Usage (starts or joins a Ray cluster)::

    summary = run_sweep(load_plan("jobs/local-demo.yaml"))
    summary.done, summary.failed   # (27, 0)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymerge.cluster.keep import KeepTopK, final_top
from raymerge.cluster.schedule import (
    ChainScheduler,
    LocalityScheduler,
    RoundRobinScheduler,
    SearchScheduler,
)
from raymerge.cluster.worker import MergeWorker
from raymerge.errors import ClusterError, StorageError
from raymerge.score.objective import Objective
from raymerge.store import inputs, manifest, storage
from raymerge.sweep.plan import Plan
from raymerge.sweep.search import Search
from raymerge.task import MergeResult, MergeTask, Status

log = logging.getLogger(__name__)

TASKS_IN_FLIGHT_PER_WORKER = 2  # one merging, one queued: no idle gap between tasks
SECONDS_PER_CALL = 0.1
"""Merge-only sweeps send each worker about this much work per call (measured as merges finish,
at most MAX_MERGES_PER_CALL): cheap merges then cost one round trip per batch, not one each."""
MAX_MERGES_PER_CALL = 32
MANIFEST_FLUSH_SECONDS = 30.0
MANIFEST_CLOSE_SECONDS = 300.0
"""How long the driver keeps trying to write the manifest when the store does not answer at the
end of a run (RAYMERGE_MANIFEST_TIMEOUT overrides it)."""
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

    @property
    def done(self) -> int:
        return sum(w.done for w in self.workers.values())

    @property
    def adapter_loads(self) -> int:
        return sum(w.adapter_loads for w in self.workers.values())

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.workers.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            done=self.done, adapter_loads=self.adapter_loads, bytes_written=self.bytes_written
        )
        return data


def run_sweep(
    plan: Plan,
    *,
    address: str | None = None,
    progress: Progress | None = None,
    start_timeout: float = 600.0,
    fail_fast: bool = False,
    rebuild_changed: bool = False,
) -> RunSummary:
    """Run every merge of `plan` that is not committed yet, and its search up to the budget;
    returns the run's summary.

    Uses the Ray instance this process is connected to, else `address`, else RAY_ADDRESS, else
    starts a local one. Merges already committed under the output (merge.json present) are
    skipped, so rerunning a spec resumes it, after checking that the inputs are those the
    committed merges were made from (`rebuild_changed` redoes the merges of changed inputs);
    with `fail_fast` the run stops dispatching at the first failed merge.
    """
    started = time.perf_counter()
    try:
        out = _prepare_output(plan, rebuild_changed)
    except storage.errors() as exc:
        raise StorageError(
            f"the output {plan.output} cannot be read or written: {storage.describe(exc)}; "
            "check the location, its permissions and free space"
        ) from exc
    search = Search(plan, out.trial_lines) if plan.spec.search is not None else None
    grid_total = plan.total()
    summary = RunSummary(output=plan.output, total=grid_total)
    pending = _pending(plan, out.committed, summary)
    first = next(pending, None)
    if first is not None:
        pending = itertools.chain([first], pending)
    if first is not None or (search is not None and not search.finished):
        if progress:
            left = 0 if search is None else plan.spec.search.budget - search.asked
            skipped = min(len(out.committed), grid_total)
            progress.start(max(0, grid_total - len(out.committed)) + left, skipped)
        scheduler = make_scheduler(plan, pending, search)
        try:
            _run_on_cluster(plan, address, start_timeout, out, scheduler, summary, progress,
                            fail_fast, search)  # fmt: skip
        except BaseException:
            out.writer.discard()  # segments published so far stay for the next run
            raise
    if search is not None:
        summary.total += search.asked
    _finish(plan, out.writer, summary)
    summary.seconds = round(time.perf_counter() - started, 3)
    if summary.merge_seconds:
        summary.merges_per_s = round(summary.done / summary.merge_seconds, 3)
    with contextlib.suppress(*storage.errors()):  # the figures are also returned and printed
        manifest.write_summary(plan.output, summary.to_json(), plan.spec.storage_options)
    if summary.stopped_by:
        raise StorageError(summary.stopped_by)
    return summary


def make_scheduler(plan: Plan, pending: Iterator[MergeTask], search):
    """The grid's tasks (locality-aware or round-robin), then the search's candidates."""
    workers = list(range(plan.spec.workers))
    if plan.spec.scheduling == "round_robin":
        grid = RoundRobinScheduler(pending, workers)
    else:
        grid = LocalityScheduler(pending)
    return grid if search is None else ChainScheduler(grid, SearchScheduler(search))


def _run_on_cluster(
    plan, address, start_timeout, out, scheduler, summary, progress, fail_fast, search
) -> None:
    with ray_session(address) as fixed_size:
        workers, groups, nodes = _start_workers(plan, start_timeout, fixed_size, out.digests)
        try:
            _score_references(plan, workers)
            dispatch = _Dispatch(
                plan, workers, scheduler, out.writer, summary, progress, fail_fast, search
            )
            for index, node in nodes.items():
                summary.workers[str(index)].node = node or ""
            dispatch_started = time.perf_counter()
            try:
                dispatch.run()
            finally:
                summary.merge_seconds = round(time.perf_counter() - dispatch_started, 3)
        finally:
            for worker in workers.values():
                ray.kill(worker, no_restart=True)
            for group in groups:
                remove_placement_group(group)


def _finish(plan: Plan, writer, summary: RunSummary) -> None:
    """keep top-k settled over every merge of the output, then the manifest compacted."""
    if plan.spec.keep is not None:
        objective = Objective.parse(plan.spec.evaluate.objective_terms())
        top = final_top(writer.lines_so_far(), plan.spec.keep.top, objective)
        dropped = [
            line
            for line in writer.lines_so_far()
            if line.get("status") == "done" and line.get("kept", True)
            and line["merge_id"] not in top
        ]  # fmt: skip
        for line in dropped:
            _drop_files(plan, line)
            writer.add({**line, "kept": False, "bytes": 0})
    timeout = float(os.environ.get("RAYMERGE_MANIFEST_TIMEOUT", MANIFEST_CLOSE_SECONDS))
    writer.close(timeout=timeout)


def _drop_files(plan: Plan, line: dict[str, Any]) -> None:
    """Remove a merge's adapter files (its merge.json stays: it can be rebuilt)."""
    folder = manifest.merge_dir(plan.output, line["merge_id"])
    uris = [storage.join(folder, name) for name in manifest.ADAPTER_FILES]
    storage.remove(uris, plan.spec.storage_options)


def _pending(plan: Plan, committed: set[str], summary: RunSummary) -> Iterator[MergeTask]:
    """The plan's tasks that are not committed yet (counting the others as skipped)."""
    for task in plan.tasks():
        if task.merge_id in committed:
            summary.skipped += 1
        else:
            yield task


@dataclass
class _Output:
    committed: set[str]
    digests: dict[str, str]
    writer: manifest.ManifestWriter
    trial_lines: list[dict[str, Any]]
    """Done search trials of earlier runs (told to the search again)."""


def _prepare_output(plan: Plan, rebuild_changed: bool) -> _Output:
    """Before any cluster work: the output is writable, its merges were made from these inputs,
    and the manifest lines of earlier runs are carried over (rebuilt where missing)."""
    options = plan.spec.storage_options
    storage.check_writable(plan.output, options)
    committed = manifest.committed_merge_ids(plan.output, options)
    digests = inputs.current_digests(plan)
    redo = inputs.check_unchanged(plan, digests, committed, rebuild_changed)
    committed -= redo
    manifest.write_inputs(plan.output, inputs.inputs_record(plan, digests), options)
    evaluate = plan.spec.evaluate
    if evaluate is not None:
        evaluation = {
            "objective": evaluate.objective_terms(),
            "sets": {name: entry["kind"] for name, entry in plan.eval_sets.items()},
            "lm_eval_tasks": evaluate.lm_eval.tasks if evaluate.lm_eval else [],
        }
        manifest.write_evaluation(plan.output, evaluation, options)
    writer = manifest.ManifestWriter(plan.output, options)
    trial_lines: list[dict[str, Any]] = []

    def carried():
        for line in _carried_lines(plan, committed):
            if line.get("trial") is not None:
                trial_lines.append(line)
            yield line

    writer.carry(carried())
    weights = {name: d["weights_sha256"] for name, d in digests.items()}
    return _Output(committed, weights, writer, trial_lines)


def _carried_lines(plan: Plan, committed: set[str]) -> Iterator[dict[str, Any]]:
    """The manifest lines of merges done by earlier runs (streamed); those lost with a killed
    driver are rebuilt from their merge.json."""
    options = plan.spec.storage_options
    listed: set[str] = set()
    for line in manifest.iter_lines(plan.output, options):
        merge_id = line.get("merge_id")
        if line.get("status") == Status.DONE and merge_id in committed and merge_id not in listed:
            listed.add(merge_id)
            yield line
    missing = committed - listed  # committed after the last manifest flush of a killed run
    for record in manifest.read_records(plan.output, sorted(missing), options):
        yield manifest.manifest_line(plan.output, record)


def _score_references(plan: Plan, workers: dict[int, Any]) -> None:
    options = plan.spec.storage_options
    if plan.spec.evaluate is not None and manifest.read_references(plan.output, options) is None:
        references = ray.get(workers[0].score_references.remote(plan.adapters_used()))
        manifest.write_references(plan.output, references, options)


class _Dispatch:
    """The dispatch loop: pull-based feeding, results, worker deaths and retries."""

    def __init__(self, plan, workers, scheduler, writer, summary, progress, fail_fast, search=None):
        self.plan = plan
        self.workers: dict[int, Any] = dict(workers)
        self.uris = plan.adapter_uris()
        self.writer = writer
        self.summary = summary
        self.progress = progress
        self.fail_fast = fail_fast
        self.stopping = False
        self.scheduler = scheduler
        self.search = search
        evaluate = plan.spec.evaluate
        self.objective = Objective.parse(evaluate.objective_terms()) if evaluate else None
        self.keep = KeepTopK(plan.spec.keep.top, self.objective) if plan.spec.keep else None
        self.in_flight: dict[Any, tuple[int, list[MergeTask]]] = {}
        # Merges per call: the scorer takes them together (several adapters per forward pass);
        # merge-only calls grow with how cheap merges turn out to be (see _batch_size).
        evaluate = plan.spec.evaluate
        self.fixed_per_call = evaluate.adapters_per_pass if evaluate is not None else None
        if evaluate is None and plan.spec.scheduling == "round_robin":
            self.fixed_per_call = 1  # task i to worker i % n, as it says
        self.seconds_per_merge: float | None = None  # moving average of finished merges
        self.probes: dict[Any, int] = {}  # info() calls on workers that died, until they are back
        self.cached: dict[int, set[str]] = {w: set() for w in workers}
        self.attempts: dict[str, int] = {}
        summary.workers = {str(w): WorkerStats() for w in workers}

    def run(self) -> None:
        for index in self.workers:
            for _ in range(TASKS_IN_FLIGHT_PER_WORKER):
                self._feed(index)
        last_flush = time.monotonic()
        while self.in_flight or self.probes:
            [ref], _ = ray.wait([*self.in_flight, *self.probes], num_returns=1)
            if ref in self.probes:
                self._probed(ref)
            else:
                self._finished(ref)
            if time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS:
                self.writer.flush()  # in the background: never blocks dispatch
                last_flush = time.monotonic()
        for task in self.scheduler.drain():  # left by --fail-fast, a fatal error, or dead workers
            if self.stopping:
                self.summary.not_run += 1
            else:
                self._record_failure(task, "not run: every merge worker died")

    def _feed(self, index: int) -> None:
        """Send worker `index` its next call: up to `per_call` tasks."""
        if self.stopping or index not in self.workers or index in self.probes.values():
            return
        expected = self.cached[index] | {
            name
            for w, tasks in self.in_flight.values()
            if w == index
            for task in tasks
            for name in task.adapters
        }
        tasks = []
        per_call = self._batch_size()
        while len(tasks) < per_call:
            task = self.scheduler.next_for(index, expected)
            if task is None:
                break
            if self.keep is not None:
                task = replace(task, keep_threshold=self.keep.threshold())
            tasks.append(task)
            expected |= set(task.adapters)
            if task.trial is not None:  # one candidate per call: the next is asked knowing more
                break
        if tasks:
            attempts = [self.attempts.get(task.merge_id, 0) for task in tasks]
            self.in_flight[self.workers[index].merge_many.remote(tasks, attempts)] = (index, tasks)

    def _batch_size(self) -> int:
        if self.fixed_per_call is not None:
            return self.fixed_per_call
        if not self.seconds_per_merge:  # nothing measured yet: one at a time
            return 1
        return max(1, min(MAX_MERGES_PER_CALL, int(SECONDS_PER_CALL / self.seconds_per_merge)))

    def _finished(self, ref) -> None:
        index, tasks = self.in_flight.pop(ref)
        try:
            results: list[MergeResult] = ray.get(ref)
        except RayActorError as exc:
            self._worker_died(index, tasks, exc)
            return
        for task, result in zip(tasks, results, strict=True):
            self._result(index, task, result)
        self._feed(index)

    def _result(self, index: int, task: MergeTask, result: MergeResult) -> None:
        stats = self.summary.workers[str(index)]
        stats.adapter_loads += result.adapter_loads
        stats.busy_seconds = round(stats.busy_seconds + result.seconds, 3)
        if result.done and result.seconds > 0:
            previous = self.seconds_per_merge or result.seconds
            self.seconds_per_merge = 0.8 * previous + 0.2 * result.seconds
        stats.peak_rss_mb = max(stats.peak_rss_mb, result.peak_rss_mb)
        stats.eval_seconds = round(stats.eval_seconds + result.eval_seconds, 3)
        self.cached[index] = set(result.cached)
        if result.done:
            line = manifest.manifest_line(
                self.plan.output, result.record, result.adapter_loads, result.load_seconds
            )
            metrics = result.record.get("metrics")
            if metrics and self.objective is not None:
                line["objective"] = round(self.objective.value(metrics), 6)
            stats.done += 1
            stats.bytes_written += line["bytes"]
            self.writer.add(line)
            if self.keep is not None:  # files of merges pushed out of the top k go now
                for merge_id in self.keep.offer(line):
                    _drop_files(self.plan, {"merge_id": merge_id})
            if self.search is not None and task.trial is not None:
                self.search.tell(task, metrics)
            if self.progress:
                self.progress.advance(result)
        elif result.retryable and self._retry(task):
            log.warning("merge %s will be retried: %s", task.merge_id, result.error)
        else:
            stats.failed += 1
            self._record_failure(task, result.error or "failed", index)
            if result.fatal and not self.stopping:
                self.summary.stopped_by = (
                    f"the sweep stopped: {result.error}. Free space or fix permissions, then run "
                    "the same spec again: committed merges are kept"
                )
            self.stopping = self.stopping or self.fail_fast or result.fatal

    def _retry(self, task: MergeTask) -> bool:
        """Queue `task` again if it has retries left."""
        attempts = self.attempts.get(task.merge_id, 0) + 1
        self.attempts[task.merge_id] = attempts
        if attempts > self.plan.spec.task_retries:
            return False
        self.summary.retries += 1
        self.scheduler.retry(task)
        return True

    def _worker_died(self, index: int, tasks: list[MergeTask], exc: Exception) -> None:
        """Retry the tasks anywhere; wait for Ray to restart the worker, or drop it if it cannot."""
        for task in tasks:
            if not self._retry(task):
                attempts = self.attempts[task.merge_id]
                error = f"worker died {attempts} times running it: {_root_error(exc)}"
                self._record_failure(task, error, index)
        self.cached[index] = set()
        if index in self.workers and index not in self.probes.values():
            self.summary.workers[str(index)].restarts += 1
            self.probes[self.workers[index].info.remote()] = index
        for other in list(self.workers):  # a retried task may go to any worker now
            self._top_up(other)

    def _probed(self, ref) -> None:
        index = self.probes.pop(ref)
        try:
            ray.get(ref)
        except RayActorError:  # out of restarts, or its node is gone
            self.workers.pop(index, None)
            self.scheduler.drop_worker(index)
            return
        self._top_up(index)

    def _top_up(self, index: int) -> None:
        busy = sum(1 for w, _ in self.in_flight.values() if w == index)
        for _ in range(TASKS_IN_FLIGHT_PER_WORKER - busy):
            self._feed(index)

    def _record_failure(self, task: MergeTask, error: str, worker: int | None = None) -> None:
        if self.search is not None and task.trial is not None:
            self.search.tell(task, None)
        self.summary.failed += 1
        if len(self.summary.failures) < MAX_FAILURES_IN_SUMMARY:
            self.summary.failures.append({"merge_id": task.merge_id, "error": error})
        self.writer.add(manifest.failure_line(task, self.uris, error))
        if self.progress:
            self.progress.advance(MergeResult.failure(task, worker=worker, error=error))


def _start_workers(plan: Plan, start_timeout: float, fixed_size: bool, digests=None):
    """Start `workers` actors, each in its own placement group, and wait until each is up.
    Returns the actors by index and their placement groups."""
    spec = plan.spec
    if fixed_size:
        _check_resources(spec)
    config = plan.worker_config()
    # One bundle per worker, STRICT_PACK: a worker's GPUs are reserved together, on one node.
    bundle = {"CPU": spec.cpus_per_worker, "GPU": spec.gpus_per_worker}
    groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(spec.workers)]
    actor = ray.remote(MergeWorker)
    workers = {
        i: actor.options(
            num_cpus=spec.cpus_per_worker,
            num_gpus=spec.gpus_per_worker,
            max_restarts=spec.max_worker_restarts,
            max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0),
        ).remote(i, config, digests)
        for i, group in enumerate(groups)
    }

    def give_up():
        for worker in workers.values():
            ray.kill(worker, no_restart=True)
        for group in groups:
            remove_placement_group(group)

    try:
        infos = ray.get([w.info.remote() for w in workers.values()], timeout=start_timeout)
    except GetTimeoutError:
        give_up()
        raise ClusterError(
            f"the {spec.workers} merge workers did not all start within {start_timeout:.0f} s; "
            f"each needs {spec.cpus_per_worker:g} CPU and {spec.gpus_per_worker:g} GPU on one "
            f"node, and the cluster has {_free_resources()} available; lower `workers` or "
            "`gpus_per_worker`, or add nodes"
        ) from None
    except RayActorError as exc:
        give_up()
        raise ClusterError(f"a merge worker failed to start: {_root_error(exc)}") from None
    return workers, groups, {info["index"]: info["node_id"] for info in infos}


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
def ray_session(address: str | None, **local: Any) -> Iterator[bool]:
    """Use the current Ray connection, else join `address`/RAY_ADDRESS, else start Ray locally
    (`local`: ray.init's sizes for that new instance, e.g. num_cpus).

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
            # "local": a new instance, never a stale one found in /tmp/ray/ray_current_cluster.
            ray.init(
                address="local", include_dashboard=False, logging_level=logging.WARNING, **local
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {exc}"
        ) from None
    try:
        yield not address
    finally:
        ray.shutdown()


def _root_error(exc: BaseException) -> str:
    """The line saying what went wrong: the cause's first line when Ray wraps one, else the
    last line of Ray's message (Ray ends it with the error its traceback led to)."""
    cause = exc.__cause__ or getattr(exc, "cause", None)
    if cause is not None:
        lines = f"{type(cause).__name__}: {cause}".strip().splitlines()
        return lines[0]
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
