"""One exception hierarchy; every message says what is wrong and what to do."""

from __future__ import annotations


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
