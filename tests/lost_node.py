"""An in-process executor whose worker 0 loses its node, as Ray 2.60 reports it: the dispatcher's
and the race's tests drive it."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from concurrent.futures import Future

from raymerge.cluster.executor import LocalWorkers, WorkerDied, WorkerUnavailable


class LostNode(LocalWorkers):
    """Worker 0's node is lost at its first merge call: its calls fail as Ray's do, and its
    probes get `answers` in turn ("restarting", "dead"; then it is back; None: restarting for
    ever). The other workers' calls wait until it is given work again (`hold` seconds at most),
    so that they cannot finish the sweep alone meanwhile."""

    def __init__(self, workers, answers: list[str] | None, hold: float = 5.0):
        super().__init__(workers)
        self.hold = hold
        self.answers = itertools.repeat("restarting") if answers is None else iter(answers)
        self.state = "up"
        self.back = threading.Event()
        self.calls_after_back: Counter[str] = Counter()
        """Worker 0's calls (by method) once it is back."""

    def submit(self, index: int, method: str, *args) -> Future:
        if index == 0 and self.state != "back":
            if method != "info":
                self.state = "down"
                return _failed(WorkerUnavailable("RpcError: Socket closed"))
            answer = next(self.answers, "back")
            if answer == "restarting":
                return _failed(WorkerUnavailable("IOError: The actor is restarting."))
            if answer == "dead":
                self.back.set()  # never back: the others go on
                return _failed(WorkerDied("ActorDiedError: The actor died unexpectedly"))
            self.state = "back"
        elif index == 0 and method != "info":
            self.back.set()  # back and given work: the others go on
            self.calls_after_back[method] += 1
        elif method != "info":
            call = getattr(self.workers[index], method)
            return self._threads.submit(self._after_back, call, args)
        return super().submit(index, method, *args)

    def _after_back(self, call, args):
        if not self.back.wait(self.hold):
            self.back.set()  # it is not coming back: the others go on
        return call(*args)


def _failed(error: Exception) -> Future:
    future = Future()
    future.set_exception(error)
    return future
