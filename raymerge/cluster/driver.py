"""The driver: connects to Ray, starts merge workers, feeds them tasks as they free up, retries
tasks whose worker died, and keeps the manifest and summary. It knows nothing of the merge math.

Each of those jobs has its module: `session` (Ray), `workers` (actors, placement groups,
resources), `resume` (what the output holds already), `dispatch` (feeding workers, retries),
`prune` (keep top-k's deletions) and `summary` (progress and figures); `run_sweep` strings them
together.

Usage (starts or joins a Ray cluster)::

    summary = run_sweep(load_plan("jobs/local-demo.yaml"))
    summary.done, summary.failed   # (27, 0)
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

import ray

from raymerge.cluster.dispatch import Dispatch, make_scheduler
from raymerge.cluster.prune import settle_top_k
from raymerge.cluster.resume import Output, pending_tasks, prepare_output
from raymerge.cluster.session import ray_session
from raymerge.cluster.summary import Progress, RunSummary, write_summary
from raymerge.cluster.workers import start_workers, stop_workers
from raymerge.errors import ClusterError, RaymergeError, StorageError, is_out_of_memory
from raymerge.score.failures import first_line, out_of_memory_message
from raymerge.store import manifest
from raymerge.sweep.plan import Plan
from raymerge.sweep.search import Search

log = logging.getLogger(__name__)

MANIFEST_CLOSE_SECONDS = 300.0
"""How long the driver keeps trying to write the manifest when the store does not answer at the
end of a run (RAYMERGE_MANIFEST_TIMEOUT overrides it)."""


def run_sweep(
    plan: Plan,
    *,
    address: str | None = None,
    progress: Progress | None = None,
    start_timeout: float = 600.0,
    fail_fast: bool = False,
    rebuild_changed: bool = False,
) -> RunSummary:
    """Run every merge of `plan` that is not committed yet, and its search up to the budget;
    returns the run's summary.

    Uses the Ray instance this process is connected to, else `address`, else RAY_ADDRESS, else
    starts a local one. Merges already committed under the output (merge.json present) are
    skipped, so rerunning a spec resumes it, after checking that the inputs are those the
    committed merges were made from (`rebuild_changed` redoes the merges of changed inputs);
    with `fail_fast` the run stops dispatching at the first failed merge.
    """
    started = time.perf_counter()
    out = prepare_output(plan, rebuild_changed)
    search = Search(plan, out.trial_lines) if plan.spec.search is not None else None
    grid_total = plan.total()
    summary = RunSummary(output=plan.output, total=grid_total)
    pending = pending_tasks(plan, out.committed, summary)
    first = next(pending, None)  # counts the committed tasks before it as skipped
    if first is not None:
        pending = itertools.chain([first], pending)
    if first is not None or (search is not None and not search.finished):
        if progress:
            _start_progress(progress, plan, out, search, grid_total)
        scheduler = make_scheduler(plan, pending, search)
        _run_on_cluster(
            plan,
            out,
            scheduler,
            summary,
            address=address,
            start_timeout=start_timeout,
            progress=progress,
            fail_fast=fail_fast,
            search=search,
        )
    if search is not None:
        summary.total += search.asked
    _finish(plan, out.writer)
    write_summary(plan, summary, started)
    if summary.stopped_by:
        raise StorageError(summary.stopped_by)
    return summary


def _start_progress(
    progress: Progress, plan: Plan, out: Output, search: Search | None, grid_total: int
) -> None:
    """The merges left to run: the grid's uncommitted ones and the search's remaining budget."""
    left = 0 if search is None else plan.spec.search.budget - search.asked
    skipped = min(len(out.committed), grid_total)
    progress.start(max(0, grid_total - len(out.committed)) + left, skipped)


def _run_on_cluster(
    plan: Plan,
    out: Output,
    scheduler,
    summary: RunSummary,
    *,
    address: str | None,
    start_timeout: float,
    progress: Progress | None,
    fail_fast: bool,
    search: Search | None,
) -> None:
    """Start Ray and the workers, score the references, dispatch every task, stop the workers.
    On any error the manifest is left uncompacted: what was published stays for the next run."""
    try:
        with ray_session(address) as fixed_size:
            workers, groups, nodes = start_workers(plan, start_timeout, fixed_size, out.digests)
            try:
                _score_references(plan, workers)
                dispatch = Dispatch(
                    plan, workers, scheduler, out.writer, summary, progress, fail_fast, search
                )
                for index, node in nodes.items():
                    summary.workers[str(index)].node = node or ""
                dispatch_started = time.perf_counter()
                try:
                    dispatch.run()
                finally:
                    summary.merge_seconds = round(time.perf_counter() - dispatch_started, 3)
            finally:
                stop_workers(workers, groups)
    except BaseException:
        out.writer.discard()  # segments published so far stay for the next run
        raise


def _score_references(plan: Plan, workers: dict[int, Any]) -> None:
    """Score the input adapters once per output (on worker 0), unless an earlier run did. A
    failure ends the run with one line naming it (ClusterError; an input's own error as is)."""
    options = plan.spec.storage_options
    if plan.spec.evaluate is not None and manifest.read_references(plan.output, options) is None:
        names = plan.adapters_used()
        what = f"the references (the base model and input adapters {', '.join(names)}) on worker 0"
        try:
            references = ray.get(workers[0].score_references.remote(names))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log.debug("scoring the references failed:\n%s", exc)  # the worker's traceback
            if isinstance(cause, RaymergeError):
                raise type(cause)(f"scoring {what}: {cause}") from None
            if is_out_of_memory(cause):
                evaluate = plan.worker_config().evaluate
                raise ClusterError(out_of_memory_message(cause, evaluate, what)) from None
            raise ClusterError(
                f"scoring {what} failed: {type(cause).__name__}: {first_line(cause)}; fix what it "
                "names and run again, or remove `evaluate:` to merge without scoring"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(
                f"scoring {what} failed: the worker died ({first_line(exc)}); if it ran out of "
                "host memory, lower evaluate.batch_size or evaluate.adapters_per_pass"
            ) from None
        manifest.write_references(plan.output, references, options)


def _finish(plan: Plan, writer: manifest.ManifestWriter) -> None:
    """keep top-k settled over every merge of the output, then the manifest compacted."""
    settle_top_k(plan, writer)
    timeout = float(os.environ.get("RAYMERGE_MANIFEST_TIMEOUT", MANIFEST_CLOSE_SECONDS))
    writer.close(timeout=timeout)
