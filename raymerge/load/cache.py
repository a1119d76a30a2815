"""One cache of loaded input adapters for every engine: least recently used out first, bounded
by bytes, with O(1) accounting. Engines that keep their own copy of an adapter (PEFT's path loads
it into the PeftModel) charge its bytes to the entry and are told when it leaves.

Example:
    >>> cache = AdapterCache(load=lambda name: name * 3, size=len, budget=6)
    >>> cache.get("ab"), cache.get("cd"), cache.loads
    ('ababab', 'cdcdcd', 2)
    >>> cache.evict(keep={"cd"}); cache.names()
    ['cd']
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class AdapterCache(Generic[T]):
    """Loaded adapters by name, LRU first; `budget` bytes at most once evicted (None: no limit)."""

    def __init__(
        self,
        load: Callable[[str], T],
        size: Callable[[T], int],
        budget: int | None = None,
        on_evict: Callable[[str], None] | None = None,
    ):
        self._load = load
        self._size = size
        self.budget = budget
        self._on_evict = on_evict
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self.total_bytes = 0
        self.loads = 0
        self.load_seconds = 0.0

    def get(self, name: str) -> T:
        """The adapter, loaded on first use (and counted as a load)."""
        if name in self._entries:
            self._entries.move_to_end(name)
            return self._entries[name]
        started = time.perf_counter()
        entry = self._load(name)
        self.load_seconds += time.perf_counter() - started
        self.loads += 1
        self._entries[name] = entry
        self._bytes[name] = self._size(entry)
        self.total_bytes += self._bytes[name]
        return entry

    def charge(self, name: str, extra_bytes: int) -> None:
        """Count memory another copy of `name` takes (an engine's own) against the budget."""
        if name in self._entries:
            self._bytes[name] += extra_bytes
            self.total_bytes += extra_bytes

    def evict(self, keep: Collection[str] = ()) -> None:
        """Drop least recently used adapters, except `keep`, until the budget holds."""
        if self.budget is None:
            return
        for name in list(self._entries):
            if self.total_bytes <= self.budget:
                break
            if name not in keep:
                self._drop(name)

    def clear(self) -> None:
        for name in list(self._entries):
            self._drop(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _drop(self, name: str) -> None:
        del self._entries[name]
        self.total_bytes -= self._bytes.pop(name)
        if self._on_evict is not None:
            self._on_evict(name)
