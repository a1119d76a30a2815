"""What a scoring failure tells the user: an out-of-memory (`raymerge.errors.is_out_of_memory`)
named as one, with what to change.

No torch here: the driver reads these too, from exceptions a worker raised.

Example:
    >>> from raymerge.task import EvalConfig
    >>> config = EvalConfig(datasets={}, batch_size=8, adapters_per_pass=16, max_length=128)
    >>> error = RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
    >>> print(out_of_memory_message(error, config, "a pass of 16 merges"))  # doctest: +ELLIPSIS
    scoring a pass of 16 merges ran out of memory (CUDA out of memory. Tried to allocate ...): ...
"""

from __future__ import annotations

from raymerge.task import EvalConfig


def out_of_memory_message(exc: BaseException, config: EvalConfig, what: str) -> str:
    """One line: which scoring ran out of memory, how large its passes are, what to change."""
    per_merge = config.batch_size * (config.max_length + 1)
    return (
        f"scoring {what} ran out of memory ({first_line(exc)}): a forward pass holds up to "
        f"evaluate.adapters_per_pass {config.adapters_per_pass} x evaluate.batch_size "
        f"{config.batch_size} x (evaluate.max_length {config.max_length} + 1) = "
        f"{config.adapters_per_pass * per_merge} tokens; lower evaluate.adapters_per_pass or "
        "evaluate.batch_size, or raise gpu_headroom_gb (the memory each GPU keeps free of base "
        "weights), and run again (committed merges are kept)"
    )


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (never a traceback)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
