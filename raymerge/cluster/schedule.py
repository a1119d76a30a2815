"""Which task a free worker gets next: pull-based, locality-aware, lazy.

Workers ask for work as they free up, so a worker busy with slow svd merges never holds back the
rest. The scheduler keeps a bounded window of upcoming tasks grouped by adapter set, and gives a
worker the tasks of the set it is working through, else the set that best overlaps the adapters it
already holds. The plan is never materialised: the window refills from the task iterator.

Example:
    >>> tasks = [MergeTask(f"{i:016x}", pair, (0.5, 0.5), "cat", {}, 0, i, "float32")
    ...          for i, pair in enumerate([("a", "b"), ("c", "d"), ("c", "d")])]
    >>> scheduler = LocalityScheduler(iter(tasks))
    >>> scheduler.next_for(worker=0, cached={"c", "d"}).adapters
    ('c', 'd')
    >>> scheduler.next_for(worker=1, cached=set()).adapters  # the set nobody works through
    ('a', 'b')
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Collection, Iterator

from raymerge.task import MergeTask

WINDOW_TASKS = 4096
"""Upcoming tasks held in memory for locality decisions."""
SCAN_SETS = 32
"""Adapter sets compared when a worker needs a new one (oldest first, to bound the cost)."""


class LocalityScheduler:
    """Hands each free worker the task whose adapters it most likely holds already."""

    def __init__(self, tasks: Iterator[MergeTask], window: int = WINDOW_TASKS):
        self._tasks = tasks
        self._limit = window
        self._window: OrderedDict[tuple[str, ...], deque[MergeTask]] = OrderedDict()
        self._held = 0
        self._retries: deque[MergeTask] = deque()
        self._current: dict[int, tuple[str, ...]] = {}

    def retry(self, task: MergeTask) -> None:
        """Queue a task again (its worker died); it goes out before new ones, to any worker."""
        self._retries.append(task)

    def drop_worker(self, worker: int) -> None:
        """`worker` is gone (for now or for good); the set it was working through is free for
        others."""
        self._current.pop(worker, None)

    def add_worker(self, worker: int) -> None:
        """`worker` is back (restarted, its cache empty): it picks a set at its next ask."""

    def next_for(self, worker: int, cached: Collection[str]) -> MergeTask | None:
        """The next task for `worker`, which holds the adapters `cached`; None when all are out."""
        if self._retries:
            return self._retries.popleft()
        self._refill()
        key = self._current.get(worker)
        if key not in self._window:
            key = self._best_set(worker, cached)
            if key is None:
                return None
            self._current[worker] = key
        queue = self._window[key]
        task = queue.popleft()
        if not queue:
            del self._window[key]
        self._held -= 1
        return task

    def drain(self) -> Iterator[MergeTask]:
        """Every task not handed out yet."""
        yield from self._retries
        self._retries.clear()
        for queue in self._window.values():
            yield from queue
        self._window.clear()
        yield from self._tasks

    def _refill(self) -> None:
        while self._held < self._limit:
            task = next(self._tasks, None)
            if task is None:
                return
            self._window.setdefault(task.adapters, deque()).append(task)
            self._held += 1

    def _best_set(self, worker: int, cached: Collection[str]) -> tuple[str, ...] | None:
        """Most adapters already held, then not being worked through by another worker, then
        oldest."""
        claimed = {key for w, key in self._current.items() if w != worker}
        best, best_score = None, None
        for age, key in enumerate(itertools.islice(self._window, SCAN_SETS)):
            score = (sum(name in cached for name in key), key not in claimed, -age)
            if best_score is None or score > best_score:
                best, best_score = key, score
        return best


class RoundRobinScheduler:
    """Task i goes to worker i mod n, whatever it holds: the baseline for locality."""

    def __init__(self, tasks: Iterator[MergeTask], workers: Collection[int]):
        self._tasks = tasks
        self._order = list(workers)
        self._queues: dict[int, deque[MergeTask]] = {w: deque() for w in self._order}
        self._retries: deque[MergeTask] = deque()

    def retry(self, task: MergeTask) -> None:
        self._retries.append(task)

    def drop_worker(self, worker: int) -> None:
        """`worker` is gone (for now or for good): its queued tasks go to the others."""
        if worker in self._queues:
            self._order.remove(worker)
            self._retries.extend(self._queues.pop(worker))

    def add_worker(self, worker: int) -> None:
        """`worker` is back: it takes its turn again from the next tasks dealt out."""
        if worker not in self._queues:
            self._order.append(worker)
            self._queues[worker] = deque()

    def drain(self) -> Iterator[MergeTask]:
        """Every task not handed out yet."""
        yield from self._retries
        self._retries.clear()
        for queue in self._queues.values():
            yield from queue
            queue.clear()
        yield from self._tasks

    def next_for(self, worker: int, cached: Collection[str]) -> MergeTask | None:
        if self._retries:
            return self._retries.popleft()
        while not self._queues[worker]:
            batch = list(itertools.islice(self._tasks, len(self._order)))
            if not batch:
                return None
            for w, task in zip(self._order, batch, strict=False):
                self._queues[w].append(task)
        return self._queues[worker].popleft()


class SearchScheduler:
    """Asks the search for a candidate whenever a worker frees up (never ahead of need), up to
    `search.candidates_per_worker` out on each worker at once."""

    def __init__(self, search):
        self._search = search
        self._limit = search.spec.candidates_per_worker
        self._workers: dict[str, int] = {}  # merge_id -> the worker it went to

    def next_for(self, worker: int, cached: Collection[str]) -> MergeTask | None:
        self._workers = {m: w for m, w in self._workers.items() if self._search.out(m)}
        if sum(w == worker for w in self._workers.values()) >= self._limit:
            return None
        task = self._search.ask()
        if task is not None:
            self._workers[task.merge_id] = worker
        return task

    def retry(self, task: MergeTask) -> None:
        self._search.retry(task)

    def drop_worker(self, worker: int) -> None:
        pass

    def add_worker(self, worker: int) -> None:
        pass

    def drain(self) -> Iterator[MergeTask]:
        yield from self._search.drain()


class ChainScheduler:
    """The grid's tasks first, then the search's candidates."""

    def __init__(self, *schedulers):
        self._schedulers = schedulers

    def next_for(self, worker: int, cached: Collection[str]) -> MergeTask | None:
        for scheduler in self._schedulers:
            task = scheduler.next_for(worker, cached)
            if task is not None:
                return task
        return None

    def retry(self, task: MergeTask) -> None:
        target = self._schedulers[-1] if task.trial is not None else self._schedulers[0]
        target.retry(task)

    def drop_worker(self, worker: int) -> None:
        for scheduler in self._schedulers:
            scheduler.drop_worker(worker)

    def add_worker(self, worker: int) -> None:
        for scheduler in self._schedulers:
            scheduler.add_worker(worker)

    def drain(self) -> Iterator[MergeTask]:
        for scheduler in self._schedulers:
            yield from scheduler.drain()
