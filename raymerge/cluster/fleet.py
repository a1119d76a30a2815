"""Which merge workers can take work: the one place that knows a worker is down, probes it until
Ray has restarted it, takes it up again, or drops it for good. Everything that sends workers
work (dispatch, a race's rounds, a search's candidates) goes through one `Fleet`, so a worker
lost in a race stays lost for the merges after it, and one restarted is given work again
wherever the run is.

Usage::

    fleet = Fleet(workers)                       # executor.RayWorkers or LocalWorkers
    fleet.went_down(index, exc)                  # a call found its worker gone: probe it
    call = fleet.first_done([*calls])            # calls and probes; None when a probe is due
    if fleet.is_probe(call):
        worker = fleet.probed(call)              # back (give it work), or None
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from raymerge.cluster.executor import Probes, WorkerDied, WorkerUnavailable

log = logging.getLogger("raymerge.cluster.dispatch")  # where these lines always were logged

RESTART_WAIT_SECONDS = 600.0
"""How long a run whose every worker is down waits for one to come back (as long as a run waits
for its workers to start; RAYMERGE_RESTART_TIMEOUT overrides it): then the rest is not run."""


@dataclass(eq=False)  # compared by identity: two workers are never "equal"
class WorkerState:
    """What the run knows of one merge worker."""

    index: int
    cached: set[str] = field(default_factory=set)
    """The adapters in its cache, as its last result listed them (empty after it died)."""
    alive: bool = True
    """False once it is dropped for good: out of restarts, or not back when it was needed."""
    down: bool = False
    """Died or unreachable: given no work until a probe finds it back."""
    restarts: int = 0
    """Times it went down and Ray restarted it (or may still)."""


class Fleet:
    """The workers' states and the probes of those that are down."""

    def __init__(self, executor, restart_timeout: float | None = None):
        self.executor = executor
        self.workers = {index: WorkerState(index) for index in executor.indices()}
        self.probes = Probes(executor)
        default = float(os.environ.get("RAYMERGE_RESTART_TIMEOUT", RESTART_WAIT_SECONDS))
        self.restart_timeout = default if restart_timeout is None else restart_timeout
        self.stalled_since: float | None = None  # since when every worker left is down

    def alive(self) -> list[WorkerState]:
        return [worker for worker in self.workers.values() if worker.alive]

    def up(self) -> list[WorkerState]:
        """The workers that can take work now."""
        return [worker for worker in self.alive() if not worker.down]

    def went_down(self, index: int, exc: WorkerDied) -> bool:
        """A call found worker `index` gone: it gets no work until a probe finds it back.
        True if that is news (it was up)."""
        worker = self.workers[index]
        worker.cached = set()
        if not worker.alive or worker.down:
            return False
        log.warning("merge worker %d died (%s); Ray restarts it if it can", index, exc)
        worker.down = True
        worker.restarts += 1
        self.probes.send(index)
        return True

    def is_probe(self, call) -> bool:
        return call in self.probes.out

    def probed(self, call) -> WorkerState | None:
        """A probe's answer: its worker if it is back up; None if it is still restarting (it is
        asked again later) or Ray will not restart it (it is dropped)."""
        index, error = self.probes.answer(call)
        worker = self.workers[index]
        if isinstance(error, WorkerUnavailable):
            return None
        if error is not None:  # out of restarts: this death was not followed by a restart
            worker.restarts -= 1
            self.lose(worker, f"Ray will not restart it: {error}")
            return None
        log.warning("merge worker %d is back after a restart", index)
        worker.down = False
        self.stalled_since = None
        return worker

    def lose(self, worker: WorkerState, why: str) -> None:
        """Drop `worker` for good."""
        log.warning("merge worker %d is dropped from the run: %s", worker.index, why)
        worker.alive = worker.down = False
        self.probes.forget(worker.index)

    def lose_down(self, why: str) -> None:
        """Drop every worker that is down (the run needs them no more)."""
        for worker in self.alive():
            if worker.down:
                self.lose(worker, why)

    def wait_for_restarts(self) -> bool:
        """With work left and no call out: whether to wait for workers that are down. Every one
        left is down: wait, at most `restart_timeout` in all, then drop them and stop."""
        down = [worker for worker in self.alive() if worker.down]
        if not down or len(down) < len(self.alive()):
            return False
        now = time.monotonic()
        if self.stalled_since is None or now - self.stalled_since < self.restart_timeout:
            self.stalled_since = self.stalled_since or now
            return True
        self.lose_down(f"no merge worker came back within {self.restart_timeout:.0f} s")
        return False

    def first_done(self, calls: list[Any]) -> Any:
        """The first of `calls` or of the probes out to finish; None once a probe is due (sent
        here) or the wait for restarts is over."""
        times = list(self.probes.due.values())
        if self.stalled_since is not None:
            times.append(self.stalled_since + self.restart_timeout)
        timeout = max(0.0, min(times) - time.monotonic()) if times else None
        calls = [*calls, *self.probes.out]
        if not calls:  # only workers waiting for their next probe
            time.sleep(timeout or 0.0)
            done = None
        else:
            done = self.executor.first_done(calls, timeout)
        if done is None:
            self.probes.send_due()
        return done
