"""The merge worker: a thin Ray-facing class that wires the merge side (`Merger`: held base model,
adapter cache, engines), the scorer and the publisher (files first, merge.json last).

The driver wraps `MergeWorker` in a Ray actor with explicit `num_cpus`/`num_gpus`; Ray then sets
CUDA_VISIBLE_DEVICES so that the base model, when its weights are needed, is sharded over this
actor's GPUs only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import raymerge
from raymerge.cluster.keep import keeps_files
from raymerge.cluster.merger import Merger
from raymerge.errors import MergeError, RaymergeError, is_out_of_memory
from raymerge.merge.tensors import AdapterTensors, MergedAdapter
from raymerge.score.failures import out_of_memory_message
from raymerge.score.objective import Objective
from raymerge.store import manifest, publish, storage
from raymerge.task import MergeResult, MergeTask, Status, WorkerConfig

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
        _quiet_library_logs()
        torch.set_num_threads(max(1, config.num_threads))
        self.index = index
        self.config = config
        self.merger = Merger(config, input_digests)
        self.base = self.merger.base
        self.scorer = None
        self.objective = None
        if config.evaluate is not None:
            from raymerge.score.scorer import Scorer

            self.scorer = Scorer(self.base, config.evaluate, config.storage_options)
            self.objective = Objective.parse(config.evaluate.objective)
        if config.evaluate is not None or config.engine == "peft":
            _ = self.base.model  # needed by every merge: load now, fail at start if it cannot

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

    def merge(self, task: MergeTask, attempt: int = 0) -> MergeResult:
        """One task: see `merge_many`."""
        return self.merge_many([task], [attempt])[0]

    def merge_many(self, tasks: list[MergeTask], attempts: list[int]) -> list[MergeResult]:
        """Merge each task, score the merges together (several per forward pass), then write
        each one's files and commit its merge.json. Never raises for a bad merge: each result
        says what happened to its task.

        A retried task (`attempt` > 0) whose merge.json exists was committed by a worker that died
        right after: it is reported, not written again.
        """
        keep = {name for task in tasks for name in task.adapters}
        if self.scorer is None:  # merge only: each merge written as soon as it is made
            results = [
                self._merge_and_commit(task, attempt)
                for task, attempt in zip(tasks, attempts, strict=True)
            ]
            self.merger.release(keep)
            return results
        jobs = [
            self._merge_job(task, attempt) for task, attempt in zip(tasks, attempts, strict=True)
        ]
        pending = [job for job in jobs if job.result is None]
        metrics: list[dict | None] = [None] * len(pending)
        if pending:
            started = time.perf_counter()
            try:
                with _captured_warnings() as caught:
                    metrics = self.scorer.score_merged([job.merged for job in pending])
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
                job.started -= share  # each merge's time includes its share of the pass
                job.eval_seconds = share
        for job, job_metrics in zip(pending, metrics, strict=True):
            if job.result is None:
                self._guarded(job, lambda job=job, m=job_metrics: self._commit(job, m))
        self.merger.release(keep)
        return [job.result for job in jobs]

    def _merge_and_commit(self, task: MergeTask, attempt: int) -> MergeResult:
        """One merge-only task, start to commit (one merged adapter in memory at a time)."""
        job = self._merge_job(task, attempt)
        if job.result is None:
            self._guarded(job, lambda: self._commit(job, None))
        return job.result

    def _merge_job(self, task: MergeTask, attempt: int) -> _Job:
        cache = self.merger.cache
        job = _Job(task, time.perf_counter(), cache.loads, cache.load_seconds)

        def merge() -> None:
            if attempt:
                record = manifest.read_committed(
                    self.config.output, task.merge_id, self.config.storage_options
                )
                if record is not None:
                    job.result = self._result(job, Status.DONE, record=record)
                    return
            job.inputs = self.merger.inputs(task.adapters)
            job.merged = self.merger.merge(task, job.inputs)

        self._guarded(job, merge)
        return job

    def _commit(self, job: _Job, metrics: dict | None) -> None:
        task = job.task
        folder = manifest.merge_dir(self.config.output, task.merge_id)
        keep = True
        if self.objective is not None:
            keep = keeps_files(self.objective, metrics, task.keep_threshold)
        options = self.config.storage_options
        files = publish.write_adapter(folder, job.merged, options, keep=keep)
        ran = job.merged.ran
        record = manifest.merge_record(
            task,
            inputs=[adapter.provenance for adapter in job.inputs],
            base_model=self.config.base_model,
            engine=ran.engine,
            engine_fallback=ran.fallback,
            metrics=metrics,
            compute_dtype=ran.compute_dtype,
            files=files,
            seconds=time.perf_counter() - job.started,
            worker={
                "index": self.index,
                "host": socket.gethostname(),
                "device": ran.device,
                "threads": torch.get_num_threads(),
            },
            task_type=self.config.task_type,
            versions=_versions(),
            warnings=_warning_texts(job.caught),
        )
        publish.commit(self.config.output, folder, record, options)
        job.result = self._result(job, Status.DONE, record=record)

    def _guarded(self, job: _Job, step) -> None:
        """Run one step of a job; an error becomes its failed result (warnings are kept)."""
        try:
            with _captured_warnings() as caught:
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

    def score_references(self, names: list[str]) -> dict[str, Any]:
        """The base model alone and each input adapter alone, on every eval set."""
        return self.scorer.references(self.merger.inputs(names))

    def _result(self, job: _Job, status: Status, **extra) -> MergeResult:
        return MergeResult(
            merge_id=job.task.merge_id,
            status=status,
            worker=self.index,
            adapter_loads=self.merger.cache.loads - job.loads,
            load_seconds=self.merger.cache.load_seconds - job.load_seconds,
            seconds=time.perf_counter() - job.started,
            cached=tuple(sorted(self.merger.cache.names())),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            eval_seconds=round(job.eval_seconds, 4),
            **extra,
        )


@dataclass
class _Job:
    """One task on its way through a worker."""

    task: MergeTask
    started: float
    loads: int
    """The cache's load count when it started (its own loads are the difference)."""
    load_seconds: float
    caught: list = field(default_factory=list)
    """Warnings raised while it was worked on."""
    inputs: list[AdapterTensors] | None = None
    merged: MergedAdapter | None = None
    result: MergeResult | None = None
    eval_seconds: float = 0.0


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list]:
    """Library warnings raised during one merge (PEFT reports merge caveats as UserWarnings),
    collected for its merge.json instead of being printed or discarded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _warning_texts(caught: list) -> list[str]:
    return sorted({f"{w.category.__name__}: {w.message}" for w in caught})


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "raymerge": raymerge.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _quiet_library_logs() -> None:
    """Progress bars and info logs from every worker would drown the driver's progress bar;
    warnings are kept (recorded per merge)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
