"""Dispatch: feeds merge workers tasks as they free up (pull-based), takes their results, retries
the tasks of a worker that died, and takes the worker up again once Ray has restarted it (on new
capacity, if its node was lost), or drops it if Ray cannot.

Usage (with started workers: `executor.RayWorkers` or `executor.LocalWorkers`)::

    Dispatch(plan, workers, make_scheduler(plan, tasks, None), writer, summary, None, False).run()
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from raymerge.cluster.executor import CALLS_PER_WORKER, WorkerDied
from raymerge.cluster.fleet import Fleet, WorkerState
from raymerge.cluster.keep import KeepTopK
from raymerge.cluster.prune import drop_files
from raymerge.cluster.race import TrialRounds, window_size
from raymerge.cluster.schedule import (
    ChainScheduler,
    LocalityScheduler,
    RoundRobinScheduler,
    SearchScheduler,
)
from raymerge.cluster.summary import Progress, RunSummary, WorkerStats
from raymerge.score.stats import objective_stderr
from raymerge.store import manifest, race_records
from raymerge.sweep.plan import Plan
from raymerge.sweep.plan import objective as objective_of
from raymerge.sweep.search import Search
from raymerge.task import MergeResult, MergeTask, Status

# The driver's logger, as before dispatch had its own module: log settings keep applying.
log = logging.getLogger(__name__)

TASKS_IN_FLIGHT_PER_WORKER = CALLS_PER_WORKER + 1
"""Calls sent to a worker ahead: one merging, one writing, one queued (no idle gap)."""
SECONDS_PER_CALL = 0.1
"""Merge-only sweeps send each worker about this much work per call (measured as merges finish,
at most MAX_MERGES_PER_CALL): cheap merges then cost one round trip per batch, not one each."""
MAX_MERGES_PER_CALL = 32
MANIFEST_FLUSH_SECONDS = 30.0


def make_scheduler(plan: Plan, pending: Iterator[MergeTask], search):
    """The grid's tasks (locality-aware or round-robin), then the search's candidates."""
    workers = list(range(plan.spec.workers))
    if plan.spec.scheduling == "round_robin":
        grid = RoundRobinScheduler(pending, workers)
    else:
        grid = LocalityScheduler(pending)
    return grid if search is None else ChainScheduler(grid, SearchScheduler(search))


class Dispatch:
    """The dispatch loop: pull-based feeding, results, worker deaths and retries."""

    def __init__(
        self,
        plan: Plan,
        workers,
        scheduler,
        writer: manifest.ManifestWriter,
        summary: RunSummary,
        progress: Progress | None,
        fail_fast: bool,
        search: Search | None = None,
        restart_timeout: float | None = None,
        fleet: Fleet | None = None,
    ):
        self.plan = plan
        self.executor = workers
        self.fleet = fleet or Fleet(workers, restart_timeout)
        self.workers = self.fleet.workers
        for worker in self.workers.values():  # down or lost in an earlier stage (a race)
            if worker.down or not worker.alive:
                scheduler.drop_worker(worker.index)
        self.uris = plan.adapter_uris()
        self.writer = writer
        self.summary = summary
        self.progress = progress
        self.fail_fast = fail_fast
        self.stopping = False
        self.scheduler = scheduler
        self.search = search
        evaluate = plan.spec.evaluate
        references = None
        if evaluate is not None:  # scored before any merge: the objective's scales
            references = manifest.read_references(plan.output, plan.spec.storage_options)
        self.objective = objective_of(plan.spec, references)
        self.keep = KeepTopK(plan.spec.keep.top, self.objective) if plan.spec.keep else None
        if self.keep is not None:  # a resumed run's top k starts from the merges it carries
            self._seed_top_k(writer)
        self.in_flight: dict[Any, tuple[WorkerState, list[MergeTask]]] = {}
        # A pruned search's candidates go round by round first (window calls), then in full.
        self.trial_rounds = TrialRounds(plan) if search is not None and search.pruning else None
        self.rounds: dict[Any, tuple[WorkerState, MergeTask, int]] = {}
        # Merges per call: the scorer takes them together (several adapters per forward pass);
        # merge-only calls grow with how cheap merges turn out to be (see _batch_size).
        self.fixed_per_call = evaluate.adapters_per_pass if evaluate is not None else None
        if evaluate is None and plan.spec.scheduling == "round_robin":
            self.fixed_per_call = 1  # task i to worker i % n, as it says
        self.seconds_per_merge: float | None = None  # moving average of finished merges
        self.attempts: dict[str, int] = {}
        summary.workers = {str(w): WorkerStats() for w in self.workers}

    def _seed_top_k(self, writer: manifest.ManifestWriter) -> None:
        """Offer keep top-k the done merges carried over from earlier runs (their last lines),
        so that this run writes files only for merges that beat them."""
        for line in writer.lines_so_far():
            if line.get("status") != Status.DONE or not line.get("metrics"):
                continue
            value = self.objective.value(line["metrics"])  # this run's objective decides
            for merge_id in self.keep.offer({**line, "objective": value}):
                drop_files(self.plan, merge_id)  # `keep.top` is smaller than when it was made

    def run(self) -> None:
        try:
            self._run()
        finally:
            for worker in self.workers.values():  # a race's restarts included
                self.summary.workers[str(worker.index)].restarts = worker.restarts

    def _run(self) -> None:
        for worker in self.workers.values():
            for _ in range(TASKS_IN_FLIGHT_PER_WORKER):
                self._feed(worker)
        last_flush = time.monotonic()
        while self._busy():
            ref = self.fleet.first_done([*self.in_flight, *self.rounds])
            if ref is None:  # a probe was due (or the wait for restarts is over)
                pass
            elif self.fleet.is_probe(ref):
                self._probed(ref)
            elif ref in self.rounds:
                self._round_done(ref)
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

    def _feed(self, worker: WorkerState) -> None:
        """Send `worker` its next call: up to `per_call` tasks."""
        if self.stopping or not worker.alive or worker.down:
            return
        expected = worker.cached | {
            name
            for w, tasks in self.in_flight.values()
            if w is worker
            for task in tasks
            for name in task.adapters
        }
        tasks = []
        per_call = self._batch_size()
        while len(tasks) < per_call:
            task = self.scheduler.next_for(worker.index, expected)
            if task is None:
                break
            if self.keep is not None:
                task = replace(task, keep_threshold=self.keep.threshold())
            tasks.append(task)
            expected |= set(task.adapters)
            if task.trial is not None:  # one candidate per call: the next is asked knowing more
                break
        if tasks and tasks[-1].trial is not None and self._rounds_first():
            # A pruned search's candidate goes round by round, whatever it was drawn with.
            self._submit_round(worker, tasks.pop(), 0)
        if tasks:
            attempts = [self.attempts.get(task.merge_id, 0) for task in tasks]
            call = self.executor.submit(worker.index, "merge_many", tasks, attempts)
            self.in_flight[call] = (worker, tasks)

    def _rounds_first(self) -> bool:
        return self.trial_rounds is not None and bool(self.trial_rounds.windows)

    def _submit_round(self, worker: WorkerState, task: MergeTask, index: int) -> None:
        if index == 0:
            self.trial_rounds.seen.pop(task.merge_id, None)  # a retried candidate starts over
        window = self.trial_rounds.windows[index]
        call = self.executor.submit(worker.index, "score_window", [task], window)
        self.rounds[call] = (worker, task, index)

    def _round_done(self, ref) -> None:
        """A search candidate scored on one window: pruned, on to the next, or scored fully."""
        worker, task, index = self.rounds.pop(ref)
        try:
            [result] = self.executor.result(ref)
        except WorkerDied as exc:
            self._worker_died(worker, [task], exc)
            return
        if result.error is not None:
            self.summary.workers[str(worker.index)].failed += 1
            self._record_failure(task, result.error, worker.index)
            self.stopping = self.stopping or result.fatal  # its output failed: no more work
            self._feed(worker)
            return
        rounds = self.trial_rounds
        window = rounds.windows[index]
        self.summary.count_scoring(window_size(rounds.sizes, window.start, window.stop))
        scores = rounds.add(task.merge_id, result.examples)
        if self.search.report(task, scores, rounds.positions(scores[1])):
            self._pruned(task, index, scores)
            self._feed(worker)
            self._feed_idle()  # a pruned candidate frees budget (a budget in evaluations)
        elif index + 1 < len(rounds.windows):
            self._submit_round(worker, task, index + 1)
        else:  # scored on everything: the rest of the examples only
            task = rounds.with_seen(task, index)
            call = self.executor.submit(worker.index, "merge_many", [task], [0])
            self.in_flight[call] = (worker, [task])

    def _pruned(self, task: MergeTask, index: int, scores: tuple[dict, dict]) -> None:
        metrics, examples = scores
        stderr = objective_stderr(self.objective, metrics, examples)
        line = race_records.stopped_line(
            task,
            self.uris,
            stopped="pruned",
            round_index=index + 1,
            metrics=metrics,
            examples_seen={name: len(next(iter(c.values()))) for name, c in examples.items()},
            objective=round(self.objective.value(metrics), 6),
            objective_stderr=round(stderr, 6) if math.isfinite(stderr) else None,
            standing={"rule": f"optuna {self.plan.spec.search.pruner}"},
        )
        self.writer.add(line)
        seen = window_size(self.trial_rounds.sizes, 0, self.trial_rounds.windows[index].stop)
        self.search.prune(task, seen / max(1, self.trial_rounds.full))
        self.summary.stopped += 1
        self.summary.count_scoring(0, self.trial_rounds.full)
        self.trial_rounds.seen.pop(task.merge_id, None)
        if self.progress:
            self.progress.advance(MergeResult(task.merge_id, Status.STOPPED, None))

    def _batch_size(self) -> int:
        if self.fixed_per_call is not None:
            return self.fixed_per_call
        if not self.seconds_per_merge:  # nothing measured yet: one at a time
            return 1
        return max(1, min(MAX_MERGES_PER_CALL, int(SECONDS_PER_CALL / self.seconds_per_merge)))

    def _finished(self, ref) -> None:
        worker, tasks = self.in_flight.pop(ref)
        try:
            results: list[MergeResult] = self.executor.result(ref)
        except WorkerDied as exc:
            self._worker_died(worker, tasks, exc)
            return
        for task, result in zip(tasks, results, strict=True):
            self._result(worker, task, result)
        self._feed(worker)
        if self.search is not None:
            self._feed_idle()

    def _feed_idle(self) -> None:
        """Feed the workers left without work when the search had no candidate for them."""
        busy = {w.index for w, _ in self.in_flight.values()}
        busy |= {w.index for w, _, _ in self.rounds.values()}
        for worker in self.workers.values():
            if worker.index not in busy:
                self._feed(worker)

    def _result(self, worker: WorkerState, task: MergeTask, result: MergeResult) -> None:
        stats = self.summary.workers[str(worker.index)]
        stats.add(result)
        if result.done and result.seconds > 0:
            previous = self.seconds_per_merge or result.seconds
            self.seconds_per_merge = 0.8 * previous + 0.2 * result.seconds
        worker.cached = set(result.cached)
        if result.done:
            self._done(stats, task, result)
        elif result.retryable and self._retry(task):
            log.warning("merge %s will be retried: %s", task.merge_id, result.error)
        else:
            stats.failed += 1
            self._record_failure(task, result.error or "failed", worker.index)
            if result.fatal and not self.stopping:
                self.summary.stopped_by = (
                    f"the sweep stopped: {result.error}. Free space or fix permissions, then run "
                    "the same spec again: committed merges are kept"
                )
            self.stopping = self.stopping or self.fail_fast or result.fatal

    def _done(self, stats: WorkerStats, task: MergeTask, result: MergeResult) -> None:
        """A committed merge: its manifest line, keep top-k, the search told, progress."""
        line = manifest.manifest_line(
            self.plan.output, result.record, result.adapter_loads, result.load_seconds
        )
        metrics = result.record.get("metrics")
        if metrics and self.objective is not None:
            line["objective"] = round(self.objective.value(metrics), 6)
            stderr = objective_stderr(self.objective, metrics, result.record.get("examples", {}))
            line["objective_stderr"] = round(stderr, 6) if math.isfinite(stderr) else None
            full = sum(m.get("examples", 0) for m in metrics.values() if "examples" in m)
            seen = task.seen.examples if task.seen is not None else {}
            prefix = sum(len(next(iter(c.values()), [])) for c in seen.values())
            self.summary.count_scoring(full - prefix, full)
        stats.done += 1
        stats.bytes_written += line["bytes"]
        self.writer.add(line)
        if self.keep is not None:  # files of merges pushed out of the top k go now
            for merge_id in self.keep.offer(line):
                drop_files(self.plan, merge_id)
        if self.search is not None and task.trial is not None:
            if self.trial_rounds is not None and metrics:  # the pruner's yardstick: every example
                examples = result.record.get("examples", {})
                positions = self.trial_rounds.full_positions()
                self.search.report(task, (metrics, examples), positions)
                self.trial_rounds.seen.pop(task.merge_id, None)
            self.search.tell(task, metrics)
        if self.progress:
            self.progress.advance(result)

    def _retry(self, task: MergeTask) -> bool:
        """Queue `task` again if it has retries left."""
        attempts = self.attempts.get(task.merge_id, 0) + 1
        self.attempts[task.merge_id] = attempts
        if attempts > self.plan.spec.task_retries:
            return False
        self.summary.retries += 1
        self.scheduler.retry(task)
        return True

    def _worker_died(self, worker: WorkerState, tasks: list[MergeTask], exc: WorkerDied) -> None:
        """Retry the tasks anywhere; the worker gets no work until a probe finds it back."""
        for task in tasks:
            if not self._retry(task):
                attempts = self.attempts[task.merge_id]
                error = f"worker died {attempts} times running it: {exc}"
                self._record_failure(task, error, worker.index)
        if self.fleet.went_down(worker.index, exc):
            self.scheduler.drop_worker(worker.index)  # its share goes to the others meanwhile
        for other in self.fleet.up():  # a retried task may go to any worker now
            self._top_up(other)

    def _probed(self, ref) -> None:
        worker = self.fleet.probed(ref)
        if worker is not None:  # back after a restart
            self.scheduler.add_worker(worker.index)
            self._top_up(worker)

    def _busy(self) -> bool:
        """Whether to go on: calls out, or workers down that the rest of the run still needs. A
        sweep whose workers that are up found no more work ends without waiting for those down;
        one whose every worker is down waits at most the restart timeout for one to come back."""
        if self.in_flight or self.rounds:
            return True
        if self.stopping or self.fleet.up():
            self.fleet.lose_down("the run has no work left for it")
            return False
        return self.fleet.wait_for_restarts()

    def _top_up(self, worker: WorkerState) -> None:
        busy = sum(1 for w, _ in self.in_flight.values() if w is worker)
        busy += sum(1 for w, _, _ in self.rounds.values() if w is worker)
        for _ in range(TASKS_IN_FLIGHT_PER_WORKER - busy):
            self._feed(worker)

    def _record_failure(self, task: MergeTask, error: str, worker: int | None = None) -> None:
        if self.search is not None and task.trial is not None:
            self.search.tell(task, None)
        self.summary.add_failure(task.merge_id, error)
        self.writer.add(manifest.failure_line(task, self.uris, error))
        if self.progress:
            self.progress.advance(MergeResult.failure(task, worker=worker, error=error))
