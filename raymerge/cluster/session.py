"""The Ray session: use the current connection, join a cluster, or start Ray locally; and the one
line worth showing from an error Ray raises.

Usage::

    with ray_session(None, num_cpus=4) as fixed_size:  # a new local instance: fixed_size is True
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import ray

from raymerge.errors import ClusterError


@contextlib.contextmanager
def ray_session(address: str | None, **local: Any) -> Iterator[bool]:
    """Use the current Ray connection, else join `address`/RAY_ADDRESS, else start Ray locally
    (`local`: ray.init's sizes for that new instance, e.g. num_cpus).

    Yields whether the cluster is of fixed size (a local instance we started: no autoscaler).
    """
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": a new instance, never a stale one found in /tmp/ray/ray_current_cluster.
            ray.init(
                address="local", include_dashboard=False, logging_level=logging.WARNING, **local
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {exc}"
        ) from None
    try:
        yield not address
    finally:
        ray.shutdown()


def root_error(exc: BaseException) -> str:
    """The line saying what went wrong: the cause's first line when Ray wraps one, else the
    last line of Ray's message (Ray ends it with the error its traceback led to).

    >>> root_error(RuntimeError("Traceback (most recent call last):\\n  ...\\nOSError: disk full"))
    'OSError: disk full'
    """
    cause = exc.__cause__ or getattr(exc, "cause", None)
    if cause is not None:
        lines = f"{type(cause).__name__}: {cause}".strip().splitlines()
        return lines[0]
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
