"""The merge worker: a thin Ray-facing class that wires the merge side (`Merger`: held base model,
adapter cache, engines), the scorer and the publisher (files first, merge.json last).

The driver wraps `MergeWorker` in a Ray actor with explicit `num_cpus`/`num_gpus`; Ray then sets
CUDA_VISIBLE_DEVICES so that the base model, when its weights are needed, is sharded over this
actor's GPUs only.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import raymerge
from raymerge.cluster.keep import keeps_files
from raymerge.cluster.merger import Merger, intra_op_threads, merge_threads
from raymerge.cluster.pipeline import CommitQueue
from raymerge.errors import MergeError, RaymergeError, is_out_of_memory
from raymerge.merge.tensors import MergedAdapter, MergeRun
from raymerge.quiet import quiet_libraries, recorded_warnings
from raymerge.score.failures import out_of_memory_message
from raymerge.score.objective import Objective
from raymerge.store import commits, manifest, publish, storage
from raymerge.task import MergeResult, MergeTask, Status, Window, WindowScores, WorkerConfig

if TYPE_CHECKING:
    from raymerge.score.scorer import Scores

log = logging.getLogger(__name__)


class MergeWorker:
    """Holds one base model and merges tasks on it, one at a time.

    Input adapters stay loaded for later merges, least recently used first out once they hold
    more than `adapter_cache_bytes`; the adapters of the merge at hand are always kept.

    Usage, in this process (without Ray)::

        worker = MergeWorker(0, plan.worker_config())
        worker.merge(next(plan.tasks())).status   # Status.DONE
    """

    def __init__(self, index: int, config: WorkerConfig, input_digests: dict | None = None):
        quiet_libraries()  # warnings inside a merge are still recorded with it
        torch.set_num_threads(max(1, config.num_threads))
        self.index = index
        self.config = config
        self.merger = Merger(config, input_digests)
        self.base = self.merger.base
        self.merge_threads = merge_threads(config, self.base.device.type)
        self.scorer = None
        self.objective = None
        if config.evaluate is not None:
            from raymerge.score.scorer import Scorer

            self.scorer = Scorer(self.base, config.evaluate, config.storage_options)
            self.objective = Objective.parse(config.evaluate.objective, config.evaluate.normalize)
        if config.evaluate is not None or config.engine == "peft":
            _ = self.base.model  # needed by every merge: load now, fail at start if it cannot
        self._merging = threading.Lock()  # one call merges at a time; another may be writing
        self.writes: CommitQueue[MergeResult] = CommitQueue(
            config.write_queue_bytes, config.writers, fatal=lambda r: r.fatal and r.error
        )
        self.upload = storage.Upload(config.upload_part_bytes, config.upload_concurrency)

    def info(self) -> dict[str, Any]:
        """Where this worker runs; the driver calls it to know the worker is (back) up."""
        import ray

        return {
            "index": self.index,
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(),
            "devices": self.base.devices(),
            "compute_device": str(self.base.device),
            "base_loaded": self.base.loaded,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def close(self) -> None:
        """Wait for the queued writes and stop the writer threads (an in-process worker)."""
        self.writes.close()

    def merge(self, task: MergeTask, attempt: int = 0) -> MergeResult:
        """One task: see `merge_many`."""
        return self.merge_many([task], [attempt])[0]

    def merge_many(self, tasks: list[MergeTask], attempts: list[int]) -> list[MergeResult]:
        """Merge each task, score the merges together (several per forward pass), then queue
        each one's files and merge.json for the writer threads; returns once every one is
        committed (or failed). Never raises for a bad merge: each result says what happened.

        Two calls may run at once (the actor's max_concurrency): one merges while the other
        waits for its writes. A retried task (`attempt` > 0) whose merge.json exists was
        committed by a worker that died right after: it is reported, not written again.
        """
        with self._merging:
            pending = self._make(tasks, attempts)
        return [item.result() if isinstance(item, Future) else item for item in pending]

    def _make(self, tasks: list[MergeTask], attempts: list[int]) -> list:
        """Merge (and score) the tasks and queue their writes: a result or a future each."""
        keep = {name for task in tasks for name in task.adapters}
        if self.scorer is None:  # merge only: each merge queued as soon as it is made
            queued = []
            for task, attempt in zip(tasks, attempts, strict=True):
                job = _Job(task, self.merger.cache.loads, self.merger.cache.load_seconds)
                self._merge_job(job, attempt)
                queued.append(self._queue(job, None))
            self.merger.release(keep)
            return queued
        jobs = [_Job(t, self.merger.cache.loads, self.merger.cache.load_seconds) for t in tasks]
        for job, attempt in zip(jobs, attempts, strict=True):
            self._merge_job(job, attempt)
        scores = self._score_all([job for job in jobs if job.result is None])
        queued = [self._queue(job, scores.get(id(job))) for job in jobs]
        self.merger.release(keep)
        return queued

    def score_window(self, tasks: list[MergeTask], window: Window) -> list[WindowScores]:
        """A race's round: merge each task and score it on `window` of every eval set, together
        (several per forward pass); nothing is written. Never raises for a bad merge."""
        with self._merging:
            jobs = [_Job(t, self.merger.cache.loads, self.merger.cache.load_seconds) for t in tasks]
            for job in jobs:
                self._merge_job(job, 0)
            scores = self._score([job for job in jobs if job.result is None], window)
            self.merger.release({name for task in tasks for name in task.adapters})
        out = []
        for job in jobs:
            seconds = round(job.seconds, 4)
            if job.result is not None:
                error, fatal = job.result.error, job.result.fatal
                out.append(
                    WindowScores(job.task.merge_id, error=error, seconds=seconds, fatal=fatal)
                )
                continue
            got = scores[id(job)]
            out.append(WindowScores(job.task.merge_id, got.metrics, got.examples, seconds=seconds))
        return out

    def _score_all(self, pending: list[_Job]) -> dict[int, Scores | None]:
        """Every merge scored on every example: a race's survivors on the rest of the order
        only (the examples it saw are scored already), the others in one pass."""
        groups: dict[Window | None, list[_Job]] = {}
        for job in pending:
            groups.setdefault(job.task.seen.rest if job.task.seen else None, []).append(job)
        scores: dict[int, Scores | None] = {}
        for window, group in groups.items():
            got = self._score(group, window)
            if window is not None:
                got = {id(job): self._completed(job, got[id(job)]) for job in group}
            scores.update(got)
        return scores

    def _completed(self, job: _Job, rest: Scores | None) -> Scores | None:
        """A survivor's scores: what the race saw and the rest, in each set's order."""
        from raymerge.score import racing
        from raymerge.score.scorer import Scores

        if rest is None:
            return None
        seen = job.task.seen
        sizes = {name: len(s.examples) for name, s in self.scorer.sets().items()}
        examples = racing.in_set_order(seen.rest.seed, sizes, seen.examples, rest.examples)
        return Scores(racing.metrics_of(examples), examples)

    def _score(self, pending: list[_Job], window: Window | None = None) -> dict[int, Scores | None]:
        """Score the merges of one pass together; a failed pass fails each of its merges."""
        if not pending:
            return {}
        started = time.perf_counter()
        scores: list[Scores | None] = [None] * len(pending)
        try:
            with recorded_warnings() as caught:
                scores = self.scorer.score_merged([job.merged for job in pending], window)
            for job in pending:
                job.caught.extend(caught)
        except Exception as exc:  # scoring failed: every merge of the pass is failed by it
            if is_out_of_memory(exc):  # named as one, with what to change (no traceback)
                what = f"the pass of {len(pending)} merge(s) this one was scored in"
                exc = MergeError(out_of_memory_message(exc, self.config.evaluate, what))
            for job in pending:
                job.result = self._failure(job, exc)
        share = (time.perf_counter() - started) / len(pending)
        for job in pending:
            job.stages["eval"] = share  # each merge's time includes its share of the pass
        return {id(job): s for job, s in zip(pending, scores, strict=True)}

    def _merge_job(self, job: _Job, attempt: int) -> None:
        """Merge one task (nothing once writing stopped: the worker makes no more)."""
        task = job.task
        if self.writes.stopped is not None:
            job.result = self._skipped(job, self.writes.stopped)
            return

        def merge() -> None:
            if attempt:
                record = commits.read_committed(
                    self.config.output, task.merge_id, self.config.storage_options
                )
                if record is not None:
                    job.result = self._result(job, Status.DONE, record=record)
                    return
            started = time.perf_counter()
            inputs = self.merger.inputs(task.adapters)
            loaded = time.perf_counter()
            with intra_op_threads(self.merge_threads):
                job.merged = self.merger.merge(task, inputs)
            job.provenance = [adapter.provenance for adapter in inputs]  # not their tensors
            job.ran = job.merged.ran
            job.stages["load"] = loaded - started
            job.stages["arithmetic"] = time.perf_counter() - loaded

        self._guarded(job, merge)
        self._settle_loads(job)

    def _settle_loads(self, job: _Job) -> None:
        """What its merge loaded, and what the cache holds after it: taken here, in the merging
        thread, as the next merges change both while it is written (once: later calls keep it)."""
        if job.settled:
            return
        job.settled = True
        cache = self.merger.cache
        job.loads, job.load_seconds = cache.loads - job.loads, cache.load_seconds - job.load_seconds
        job.cached = tuple(sorted(cache.names()))

    def _queue(self, job: _Job, scores: Scores | None):
        """The job's result if it is settled, else a future of it once its writes are done."""
        if job.result is not None:
            return job.result
        if self.writes.stopped is not None:  # stopped while it was scored
            return self._skipped(job, self.writes.stopped)
        staged = publish.stage(job.merged, job.stages)  # on CUDA: the host copy starts
        job.merged = None  # the staged buffers hold what is still needed
        return self.writes.submit(
            staged.nbytes,
            write=lambda: self._write(job, staged, scores),
            skipped=lambda why: self._skipped(job, why),
        )

    def _write(self, job: _Job, staged: publish.StagedAdapter, scores: Scores | None):
        """In a writer thread: the job's files, then its merge.json (errors become its result)."""
        try:
            self._commit(job, staged, scores)
        except Exception as exc:
            job.result = self._failure(job, exc)
        return job.result

    def _skipped(self, job: _Job, why: str) -> MergeResult:
        """Not written: the output failed fatally before this merge's turn."""
        return self._result(job, Status.FAILED, error=f"not written: {why}", fatal=True)

    def _commit(self, job: _Job, staged: publish.StagedAdapter, scores: Scores | None) -> None:
        task = job.task
        metrics = scores.metrics if scores is not None else None
        folder = manifest.merge_dir(self.config.output, task.merge_id)
        keep = True
        if self.objective is not None:
            keep = keeps_files(self._objective(), metrics, task.keep_threshold)
        options = self.config.storage_options
        files = publish.write_adapter(
            folder, staged, options, keep=keep, upload=self.upload, stages=job.stages
        )
        ran = job.ran
        record = manifest.merge_record(
            task,
            inputs=job.provenance,
            base_model=self.config.base_model,
            engine=ran.engine,
            engine_fallback=ran.fallback,
            metrics=metrics,
            examples=scores.examples if scores is not None else None,
            compute_dtype=ran.compute_dtype,
            files=files,
            seconds=job.seconds,
            worker={
                "index": self.index,
                "host": socket.gethostname(),
                "device": ran.device,
                "threads": self.merge_threads,  # the arithmetic's (an SVD's bits may vary)
            },
            task_type=self.config.task_type,
            versions=library_versions(),
            warnings=_warning_texts(job.caught),
        )
        publish.commit(self.config.output, folder, record, options, stages=job.stages)
        job.result = self._result(job, Status.DONE, record=record)

    def _guarded(self, job: _Job, step) -> None:
        """Run one step of a job; an error becomes its failed result (warnings are kept)."""
        try:
            with recorded_warnings() as caught:
                try:
                    step()
                finally:
                    job.caught.extend(caught)
        except Exception as exc:
            job.result = self._failure(job, exc)

    def _failure(self, job: _Job, exc: Exception) -> MergeResult:
        task = job.task
        if isinstance(exc, RaymergeError):  # the merge's own fault: named, recorded, goes on
            return self._result(job, Status.FAILED, error=str(exc))
        if isinstance(exc, storage.errors()):  # the store or the disk: one line, no traceback
            log.warning("merge %s could not be written: %s", task.merge_id, storage.describe(exc))
            return self._result(
                job,
                Status.FAILED,
                error=f"writing to {self.config.output} failed: {storage.describe(exc)}",
                retryable=storage.is_transient(exc),
                fatal=storage.is_fatal(exc),
            )
        # A bug or an unforeseen library error: keep the sweep going, keep the traceback.
        log.error("merge %s failed:\n%s", task.merge_id, traceback.format_exc())
        return self._result(job, Status.FAILED, error=f"{type(exc).__name__}: {exc}")

    def _objective(self) -> Objective:
        """The objective keep top-k decides by, scaled by the references where it is
        normalised (the driver writes them before any merge is dispatched)."""
        if self.objective.normalize == "references":
            options = self.config.storage_options
            references = manifest.read_references(self.config.output, options)
            self.objective = self.objective.against(references)
        return self.objective

    def score_references(self, names: list[str]) -> dict[str, Any]:
        """The base model alone and each input adapter alone, on every eval set."""
        return self.scorer.references(self.merger.inputs(names))

    def _result(self, job: _Job, status: Status, **extra) -> MergeResult:
        self._settle_loads(job)  # a no-op in the writer threads: settled once merged
        return MergeResult(
            merge_id=job.task.merge_id,
            status=status,
            worker=self.index,
            adapter_loads=job.loads,
            load_seconds=job.load_seconds,
            seconds=round(job.seconds, 4),
            cached=job.cached,
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            eval_seconds=round(job.stages.get("eval", 0.0), 4),
            stages={name: round(seconds, 6) for name, seconds in job.stages.items()},
            **extra,
        )


@dataclass
class _Job:
    """One task on its way through a worker."""

    task: MergeTask
    loads: int
    """The cache's load count when it started; once merged, its own loads."""
    load_seconds: float
    cached: tuple[str, ...] = ()
    """The adapters the cache held once it was merged."""
    settled: bool = False
    """Whether `loads`, `load_seconds` and `cached` are its own (see `_settle_loads`)."""
    caught: list = field(default_factory=list)
    """Warnings raised while it was worked on."""
    provenance: list[dict[str, Any]] = field(default_factory=list)
    """Where each input came from (its tensors are not held: the write needs only this)."""
    merged: MergedAdapter | None = None
    result: MergeResult | None = None
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds of each stage it went through (load, arithmetic, eval, serialise, ...)."""
    ran: MergeRun | None = None

    @property
    def seconds(self) -> float:
        """The work done for it: its stages' sum (not the time it waited in the queue)."""
        return sum(self.stages.values())


def _warning_texts(caught: list) -> list[str]:
    return sorted({f"{w.category.__name__}: {w.message}" for w in caught})


def library_versions() -> dict[str, str]:
    """The versions of what made a merge (its merge.json's `versions`)."""
    import peft
    import transformers

    return {
        "raymerge": raymerge.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
