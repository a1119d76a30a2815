"""A run's start, overlapped: when the run will start Ray, the plan is checked (the spec read,
every input inspected: mostly importing torch and transformers) in a thread while Ray starts in
this one, instead of one after the other. A run whose one worker runs in this process
(`driver.runs_in_process`) starts no Ray, and its plan is checked as usual.

Usage (the CLI's `run`)::

    with plan_while_ray_starts("jobs/local-demo.yaml", {}, address=None, use_ray=None) as plan:
        run_sweep(plan)   # joins the Ray session started meanwhile, if any
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from raymerge.errors import ClusterError
from raymerge.sweep.plan import Plan, load_plan

log = logging.getLogger(__name__)


@contextlib.contextmanager
def plan_while_ray_starts(
    spec_path: str | Path,
    overrides: dict[str, Any] | None,
    *,
    address: str | None,
    use_ray: bool | None,
) -> Iterator[Plan]:
    """Yield the checked plan of `spec_path`, inside the Ray session its run will use when that
    run starts Ray (started while the plan was checked; shut down on leaving). The plan's own
    errors (SpecError, InputError) win over Ray's: they are what to fix first."""
    if not _starts_ray(spec_path, overrides, address, use_ray):
        yield load_plan(spec_path, overrides)
        return
    from raymerge.cluster.session import ray_session

    checking = _in_thread(load_plan, spec_path, overrides)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(ray_session(address))
        except ClusterError:
            checking.result()  # a bad spec is reported before an unreachable cluster
            raise
        yield checking.result()


def _starts_ray(
    spec_path: str | Path, overrides: dict[str, Any] | None, address: str | None, use_ray
) -> bool:
    """Whether running this spec starts (or joins) Ray: not when connected already, nor for one
    local CPU worker (unless `use_ray`). A spec that does not parse starts nothing: loading the
    plan reports its problems."""
    from raymerge.cluster.driver import one_local_worker

    ray = sys.modules.get("ray")
    if use_ray is False or (ray is not None and ray.is_initialized()):
        return False
    if use_ray:
        return True
    from raymerge.sweep.spec import load_spec

    sizes = {k: v for k, v in (overrides or {}).items() if k in ("workers", "gpus_per_worker")}
    try:
        spec = load_spec(spec_path, sizes)
    except Exception:  # reported, with every other problem, by load_plan
        log.debug("the spec does not parse; not starting Ray", exc_info=True)
        return False
    return not one_local_worker(spec, address)


def _in_thread(function, *args) -> Future:
    """Run `function(*args)` in a daemon thread (an interrupted run does not wait for it)."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="raymerge-plan", daemon=True).start()
    return future
