"""Where the merge workers run, behind one interface for the dispatcher: Ray actors
(`RayWorkers`), or one worker in this process (`LocalWorkers`: a small local run, with no Ray
start and no second process importing torch, which is most of a one-merge run's time).

Both run up to two calls of one worker at once (one merging, one waiting for its writes) and
answer the same three questions: submit a call, which call finished first, its result. A worker
process that died raises `WorkerDied` (`WorkerUnavailable` while Ray may still bring it back: it
is restarting, or its node is lost and not yet known dead); an error raised by the call itself is
raised as is.

Usage::

    workers = LocalWorkers({0: MergeWorker(0, config)})
    call = workers.submit(0, "merge_many", tasks, attempts)
    workers.result(workers.first_done([call]))
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

CALLS_PER_WORKER = 2
"""Calls a worker runs at once (its actor's max_concurrency): one merges, one waits for writes."""
PROBE_FIRST_SECONDS = 0.5
PROBE_MAX_SECONDS = 5.0


class WorkerDied(Exception):
    """The worker's process is gone mid-call (its one-line cause is the message)."""


class WorkerUnavailable(WorkerDied):
    """The worker cannot be reached for now: Ray is restarting it (on new capacity, if its node
    was lost) or has not noticed yet that it is gone. Asking again later may find it back."""


class RayWorkers:
    """Merge workers as Ray actors (see `workers.start_workers`)."""

    kind = "ray"

    def __init__(self, actors: dict[int, Any]):
        self.actors = actors

    def indices(self) -> list[int]:
        return sorted(self.actors)

    def submit(self, index: int, method: str, *args) -> Any:
        return getattr(self.actors[index], method).remote(*args)

    def first_done(self, calls: list, timeout: float | None = None) -> Any:
        """The first call done; None if none is done within `timeout` seconds."""
        import ray

        ready, _ = ray.wait(calls, num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def result(self, call) -> Any:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        from raymerge.cluster.session import root_error

        try:
            return ray.get(call)
        except ActorUnavailableError as exc:  # Ray 2.60: restarting, or on a lost node
            raise WorkerUnavailable(root_error(exc)) from exc
        except RayActorError as exc:  # ActorDiedError: out of restarts, or killed for good
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

    def first_done(self, calls: list[Future], timeout: float | None = None) -> Future | None:
        done, _ = wait(calls, timeout=timeout, return_when=FIRST_COMPLETED)
        return next((call for call in calls if call in done), None)

    def result(self, call: Future) -> Any:
        return call.result()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers.values():
            worker.close()


class Probes:
    """info() calls asking workers that are down whether they are back, one out per worker. One
    that finds its worker still restarting is sent again later: after 0.5 s, then twice as long
    each time, at most every 5 s (cheap, and a restarted worker is taken up soon)."""

    def __init__(self, workers):
        self.workers = workers
        self.out: dict[Any, int] = {}  # call -> worker index
        self.due: dict[int, float] = {}  # worker index -> when to ask it again
        self._delay: dict[int, float] = {}

    def send(self, index: int) -> None:
        self.out[self.workers.submit(index, "info")] = index

    def answer(self, call) -> tuple[int, WorkerDied | None]:
        """The call's worker, and None if it is back, else why not (a `WorkerUnavailable` one
        is asked again later)."""
        index = self.out.pop(call)
        try:
            self.workers.result(call)
        except WorkerUnavailable as exc:
            delay = min(PROBE_MAX_SECONDS, max(PROBE_FIRST_SECONDS, 2 * self._delay.get(index, 0)))
            self._delay[index] = delay
            self.due[index] = time.monotonic() + delay
            return index, exc
        except WorkerDied as exc:
            return index, exc
        self._delay.pop(index, None)
        return index, None

    def send_due(self) -> None:
        now = time.monotonic()
        for index, due in list(self.due.items()):
            if due <= now:
                del self.due[index]
                self.send(index)

    def forget(self, index: int) -> None:
        """No more probes for `index` (it is dropped): an answer still to come is ignored."""
        self.due.pop(index, None)
        self._delay.pop(index, None)
        self.out = {call: i for call, i in self.out.items() if i != index}
