"""One exception hierarchy; every message says what is wrong and what to do."""

from __future__ import annotations

import errno


class RaymergeError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class SpecError(RaymergeError):
    """The sweep spec is invalid (bad key, value or combination). Nothing is written."""

    exit_code = 2


class InputError(RaymergeError):
    """An input (base model, adapter, storage) is missing or unusable. Nothing is written."""

    exit_code = 2


class ClusterError(RaymergeError):
    """The Ray cluster cannot run the sweep (unreachable, or too few resources)."""

    exit_code = 1


class MergeError(RaymergeError):
    """One merge failed for its own reason; the sweep records it and goes on."""

    exit_code = 1


class StorageError(RaymergeError):
    """The output cannot be written (no space, no permission, a store that stays unreachable)."""

    exit_code = 1


ALLOCATION_FAILURES = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
)
"""How torch's device and host allocators, and the OS (ENOMEM, e.g. a memory-mapped checkpoint
under a memory limit), word a failed allocation."""
PLACEMENT_FAILURE = "not enough space on"
"""accelerate's ValueError when a model's layers do not fit the devices it may use."""


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, is an allocation failure: MemoryError,
    torch's OutOfMemoryError (known by name: no torch here), a RuntimeError saying so, or
    accelerate's placement failure. A full disk is none of these.

    >>> is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    True
    >>> is_out_of_memory(OSError(12, "Cannot allocate memory"))
    True
    >>> is_out_of_memory(ValueError("a spec value says out of memory"))
    False
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
            return True
        text = str(exc).lower()
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
            return True
        # safetensors reports the OS's ENOMEM as its own error ("... (os error 12)").
        allocator = isinstance(exc, RuntimeError | OSError) or "os error 12" in text
        if allocator and any(t in text for t in ALLOCATION_FAILURES):
            return True
        if isinstance(exc, ValueError) and PLACEMENT_FAILURE in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
