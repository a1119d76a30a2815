"""A worker's write side: merges queue here once made, and writer threads serialise, hash, write
and commit them while the worker makes the next ones. Hashing and file I/O release the GIL, so
the writes run beside the arithmetic rather than after it.

The queue holds at most `budget_bytes` of merged adapters (always at least one): a store slower
than the merges makes `submit` wait (back-pressure) instead of filling memory. A fatal write
(disk full, unwritable output, store gone) stops the queue: what is still queued is not written,
its `skipped` result says why, and `stopped` tells the worker to make no more.

Usage::

    queue = CommitQueue(budget_bytes=2 * 2**30, writers=2, fatal=lambda r: r.fatal and r.error)
    future = queue.submit(nbytes, write=lambda: commit(job), skipped=lambda why: failed(job, why))
    future.result()   # the job's result, once committed (or failed, or skipped)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

R = TypeVar("R")


class CommitQueue(Generic[R]):
    """Bounded, ordered-per-job background writes with a stop on the first fatal result."""

    def __init__(self, budget_bytes: int, writers: int, fatal: Callable[[R], str | None]):
        self.budget_bytes = max(1, budget_bytes)
        self._pool = ThreadPoolExecutor(max(1, writers), thread_name_prefix="raymerge-write")
        self._fatal = fatal
        self._room = threading.Condition()
        self.queued_bytes = 0
        """Bytes of merges accepted and not yet written (or skipped)."""
        self.peak_bytes = 0
        """The most `queued_bytes` has been: at most the budget, or one merge above it."""
        self.stopped: str | None = None
        """Why writing stopped (the first fatal error), or None."""

    def submit(self, nbytes: int, write: Callable[[], R], skipped: Callable[[str], R]) -> Future:
        """Queue one merge's writes (waits while the queue is full); the future gives `write`'s
        result, or `skipped(why)`'s if writing stopped before its turn."""
        with self._room:
            while self.queued_bytes and self.queued_bytes + nbytes > self.budget_bytes:
                self._room.wait()
            self.queued_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.queued_bytes)
        return self._pool.submit(self._run, nbytes, write, skipped)

    def _run(self, nbytes: int, write: Callable[[], R], skipped: Callable[[str], R]) -> R:
        try:
            if self.stopped is not None:
                return skipped(self.stopped)
            result = write()
            why = self._fatal(result)
            if why and self.stopped is None:
                self.stopped = why
            return result
        finally:
            with self._room:
                self.queued_bytes -= nbytes
                self._room.notify_all()

    def close(self) -> None:
        """Wait for every queued write and stop the writer threads."""
        self._pool.shutdown(wait=True)
