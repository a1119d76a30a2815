"""Where the merge workers run, behind one interface for the dispatcher: Ray actors
(`RayWorkers`), or one worker in this process (`LocalWorkers`: a small local run, with no Ray
start and no second process importing torch, which is most of a one-merge run's time).

Both run up to two calls of one worker at once (one merging, one waiting for its writes) and
answer the same three questions: submit a call, which call finished first, its result. A worker
process that died raises `WorkerDied`; an error raised by the call itself is raised as is.

Usage::

    workers = LocalWorkers({0: MergeWorker(0, config)})
    call = workers.submit(0, "merge_many", tasks, attempts)
    workers.result(workers.first_done([call]))
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

CALLS_PER_WORKER = 2
"""Calls a worker runs at once (its actor's max_concurrency): one merges, one waits for writes."""


class WorkerDied(Exception):
    """The worker's process is gone mid-call (its one-line cause is the message)."""


class RayWorkers:
    """Merge workers as Ray actors (see `workers.start_workers`)."""

    kind = "ray"

    def __init__(self, actors: dict[int, Any]):
        self.actors = actors

    def indices(self) -> list[int]:
        return sorted(self.actors)

    def submit(self, index: int, method: str, *args) -> Any:
        return getattr(self.actors[index], method).remote(*args)

    def first_done(self, calls: list) -> Any:
        import ray

        [ref], _ = ray.wait(calls, num_returns=1)
        return ref

    def result(self, call) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from raymerge.cluster.session import root_error

        try:
            return ray.get(call)
        except RayActorError as exc:
            raise WorkerDied(root_error(exc)) from exc
        except RayTaskError as exc:  # the call's own error, raised as the worker raised it
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if cause is None:
                raise
            raise cause from None


class LocalWorkers:
    """One or more merge workers in this process, each call on a thread."""

    kind = "in-process"

    def __init__(self, workers: dict[int, Any]):
        self.workers = workers
        self._threads = ThreadPoolExecutor(
            CALLS_PER_WORKER * len(workers), thread_name_prefix="raymerge-worker"
        )

    def indices(self) -> list[int]:
        return sorted(self.workers)

    def submit(self, index: int, method: str, *args) -> Future:
        return self._threads.submit(getattr(self.workers[index], method), *args)

    def first_done(self, calls: list[Future]) -> Future:
        done, _ = wait(calls, return_when=FIRST_COMPLETED)
        return next(call for call in calls if call in done)

    def result(self, call: Future) -> Any:
        return call.result()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers.values():
            worker.close()
