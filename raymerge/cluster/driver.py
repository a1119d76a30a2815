"""The driver: connects to Ray, starts merge workers, feeds them tasks as they free up, retries
tasks whose worker died, and keeps the manifest and summary. It knows nothing of the merge math.

Each of those jobs has its module: `session` (Ray), `workers` (actors, placement groups,
resources), `executor` (Ray actors, or one worker in this process, behind one interface),
`resume` (what the output holds already), `dispatch` (feeding workers, retries), `prune` (keep
top-k's deletions) and `summary` (progress and figures); `run_sweep` strings them together.

Usage (starts or joins a Ray cluster)::

    summary = run_sweep(load_plan("jobs/local-demo.yaml"))
    summary.done, summary.failed   # (27, 0)
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
import time
from dataclasses import asdict

from raymerge.cluster.dispatch import Dispatch, make_scheduler
from raymerge.cluster.executor import LocalWorkers, RayWorkers, WorkerDied
from raymerge.cluster.fleet import Fleet
from raymerge.cluster.prune import settle_top_k
from raymerge.cluster.race import Race, RoundScorer, set_sizes, window_size
from raymerge.cluster.resume import Output, pending_tasks, prepare_output
from raymerge.cluster.summary import Progress, RunSummary, write_summary
from raymerge.cluster.tracking import start_tracking
from raymerge.errors import ClusterError, RaymergeError, StorageError, is_out_of_memory
from raymerge.score.failures import first_line, out_of_memory_message
from raymerge.score.objective import spread_warning
from raymerge.store import manifest
from raymerge.sweep.plan import Plan
from raymerge.sweep.plan import objective as objective_of
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
    use_ray: bool | None = None,
) -> RunSummary:
    """Run every merge of `plan` that is not committed yet, and its search up to the budget;
    returns the run's summary.

    Uses the Ray instance this process is connected to, else `address`, else RAY_ADDRESS, else
    starts a local one; a run of one CPU worker with none of those runs it in this process,
    without Ray (`use_ray`: True starts Ray anyway, False requires this process). Merges
    already committed under the output (merge.json present) are skipped, so rerunning a spec
    resumes it, after checking that the inputs are those the committed merges were made from
    (`rebuild_changed` redoes the merges of changed inputs); with `fail_fast` the run stops
    dispatching at the first failed merge.
    """
    started = time.perf_counter()
    out = prepare_output(plan, rebuild_changed)
    summary = RunSummary(output=plan.output, total=plan.total())
    tracker = start_tracking(plan, out)  # MLflow, where asked for: offered every manifest line
    try:
        _sweep(plan, out, summary, progress, address, start_timeout, fail_fast, use_ray)
        tracker.seal()
        _finish(plan, out.writer)
        write_summary(plan, summary, started)
    except BaseException as exc:
        tracker.close(summary, exc)
        raise
    tracker.close(summary)
    if summary.stopped_by:
        raise StorageError(summary.stopped_by)
    return summary


def _sweep(
    plan: Plan,
    out: Output,
    summary: RunSummary,
    progress: Progress | None,
    address: str | None,
    start_timeout: float,
    fail_fast: bool,
    use_ray: bool | None,
) -> None:
    """The race (if any), the grid's pending merges and the search, on the workers."""
    search = Search(plan, out.trial_lines) if plan.spec.search is not None else None
    grid_total = summary.total
    race = Race(plan, out.digests) if _racing(plan) else None
    if race is None:
        pending = pending_tasks(plan, out.committed, summary)
        first = next(pending, None)  # counts the committed tasks before it as skipped
        work = first is not None
        if first is not None:
            pending = itertools.chain([first], pending)
    else:
        pending, work = _race_offline(plan, race, out, summary)
    if work or (search is not None and not search.finished):
        if progress and race is None:
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
            use_ray=use_ray,
            race=race,
        )
    if search is not None:
        summary.total += search.asked


def _start_progress(
    progress: Progress, plan: Plan, out: Output, search: Search | None, grid_total: int
) -> None:
    """The merges left to run: the grid's uncommitted ones and the search's remaining budget."""
    left = 0 if search is None else search.left
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
    use_ray: bool | None,
    race: Race | None = None,
) -> None:
    """Start the workers (Ray actors, or one in this process), score the references, race the
    grid if it is raced, dispatch every task, stop the workers. On any error the manifest is
    left uncompacted: what was published stays for the next run."""
    dispatch = functools.partial(
        _dispatch, plan, scheduler, out, summary, progress, fail_fast, search, race
    )
    try:
        if _in_process(plan, address, use_ray):
            workers = _start_in_process(plan, out.digests)
            try:
                dispatch(workers, {})
            finally:
                workers.close()
            return
        from raymerge.cluster.session import ray_session
        from raymerge.cluster.workers import start_workers, stop_workers

        with ray_session(address) as fixed_size:
            actors, groups, nodes = start_workers(plan, start_timeout, fixed_size, out.digests)
            try:
                dispatch(RayWorkers(actors), nodes)
            finally:
                stop_workers(actors, groups)
    except BaseException:
        out.writer.discard()  # segments published so far stay for the next run
        raise


def _in_process(plan: Plan, address: str | None, use_ray: bool | None) -> bool:
    if use_ray is None:
        return runs_in_process(plan, address)
    if not use_ray and (plan.spec.workers != 1 or plan.spec.gpus_per_worker):
        raise ClusterError(
            f"a run in this process has one CPU worker; this spec asks for workers="
            f"{plan.spec.workers} with gpus_per_worker={plan.spec.gpus_per_worker:g}: run it on Ray"
        )
    return not use_ray


def runs_in_process(plan: Plan, address: str | None) -> bool:
    """Whether the run's one worker runs in this process, with no Ray at all: one CPU worker,
    no cluster named (`address`, RAY_ADDRESS) and none connected. Starting Ray and a worker
    process that imports torch again is most of a small local run's time."""
    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    spec = plan.spec
    cluster = address or os.environ.get("RAY_ADDRESS") or connected
    return spec.workers == 1 and spec.gpus_per_worker == 0 and not cluster


def _start_in_process(plan: Plan, digests) -> LocalWorkers:
    from raymerge.cluster.worker import MergeWorker

    try:
        worker = MergeWorker(0, plan.worker_config(in_process=True), digests)
    except RaymergeError:
        raise
    except Exception as exc:  # as a worker that failed to start on Ray is reported
        log.debug("the merge worker failed to start", exc_info=True)
        raise ClusterError(
            f"a merge worker failed to start: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return LocalWorkers({0: worker})


def _dispatch(
    plan, scheduler, out, summary, progress, fail_fast, search, race, workers, nodes: dict
) -> None:
    summary.executor = workers.kind
    note = getattr(progress, "note", None)
    _score_references(plan, workers, note)
    dispatch_started = time.perf_counter()
    fleet = Fleet(workers)  # one view of which workers are up, for the race and the merges
    if race is not None and race.survivors is None:  # not settled offline: race on the workers
        scorer = RoundScorer(fleet, plan, note).score
        race.survivors = race.run(_race_objective(plan), scorer, note)
        _settle_race(plan, race, out, summary)
        if progress:
            left = [t for t in race.survivors if t.merge_id not in out.committed]
            budget = search.left if search is not None else 0
            progress.start(len(left) + budget, len(race.survivors) - len(left))
    dispatch = Dispatch(
        plan, workers, scheduler, out.writer, summary, progress, fail_fast, search, fleet=fleet
    )
    for index, node in nodes.items():
        summary.workers[str(index)].node = node or ""
    try:
        dispatch.run()
    finally:
        summary.merge_seconds = round(time.perf_counter() - dispatch_started, 3)


def _racing(plan: Plan) -> bool:
    evaluate = plan.spec.evaluate
    return evaluate is not None and evaluate.racing is not None and plan.total() > 0


def _race_objective(plan: Plan):
    options = plan.spec.storage_options
    return objective_of(plan.spec, manifest.read_references(plan.output, options))


def _race_offline(plan: Plan, race: Race, out: Output, summary: RunSummary):
    """(the grid's pending tasks, whether any work is left): the race replayed from its journal
    when every round is committed there (no workers needed), else the survivors once the
    workers have raced the rest (`_dispatch`)."""
    if manifest.read_references(plan.output, plan.spec.storage_options) is not None:
        race.survivors = race.run(_race_objective(plan), None)
    if race.survivors is None:
        return _raced(race, out, summary), True
    _settle_race(plan, race, out, summary)
    pending = list(_raced(race, out, summary))
    return iter(pending), bool(pending)


def _raced(race: Race, out: Output, summary: RunSummary):
    """The race's survivors not committed yet (a generator: read once the race is run)."""
    for task in race.survivors:
        if task.merge_id in out.committed:
            summary.skipped += 1
        else:
            yield task


def _settle_race(plan: Plan, race: Race, out: Output, summary: RunSummary) -> None:
    """The stopped merges' and the race's failures' manifest lines, and its figures."""
    full = window_size(set_sizes(plan), 0, max(set_sizes(plan).values()))
    for line in race.stopped_lines:
        if line["merge_id"] not in out.committed:  # made fully by an earlier run: it stays done
            out.writer.add(line)
            summary.stopped += 1
    summary.count_scoring(sum(r.examples_scored for r in race.rounds), full * summary.stopped)
    for merge_id, error in race.failures.items():
        task = race.tasks[merge_id]
        summary.add_failure(merge_id, error)
        out.writer.add(manifest.failure_line(task, plan.adapter_uris(), error))
    summary.race = [asdict(r) for r in race.rounds]


def _score_references(plan: Plan, workers, note=None) -> None:
    """Score the input adapters once per output (on worker 0), unless an earlier run did. A
    failure ends the run with one line naming it (ClusterError; an input's own error as is)."""
    options = plan.spec.storage_options
    if plan.spec.evaluate is None or manifest.read_references(plan.output, options) is not None:
        return
    names = plan.adapters_used()
    what = f"the references (the base model and input adapters {', '.join(names)}) on worker 0"
    if note is not None:
        note(f"Scoring {what} …")
    try:
        references = workers.result(workers.submit(0, "score_references", names))
    except WorkerDied as exc:
        raise ClusterError(
            f"scoring {what} failed: the worker died ({exc}); if it ran out of "
            "host memory, lower evaluate.batch_size or evaluate.adapters_per_pass"
        ) from None
    except RaymergeError as cause:
        raise type(cause)(f"scoring {what}: {cause}") from None
    except Exception as cause:
        log.debug("scoring the references failed", exc_info=True)  # the worker's traceback
        if is_out_of_memory(cause):
            evaluate = plan.worker_config().evaluate
            raise ClusterError(out_of_memory_message(cause, evaluate, what)) from None
        raise ClusterError(
            f"scoring {what} failed: {type(cause).__name__}: {first_line(cause)}; fix what it "
            "names and run again, or remove `evaluate:` to merge without scoring"
        ) from None
    manifest.write_references(plan.output, references, options)
    warning = spread_warning(objective_of(plan.spec), references)
    if warning:
        log.warning(warning)


def _finish(plan: Plan, writer: manifest.ManifestWriter) -> None:
    """keep top-k settled over every merge of the output, then the manifest compacted."""
    settle_top_k(plan, writer)
    timeout = float(os.environ.get("RAYMERGE_MANIFEST_TIMEOUT", MANIFEST_CLOSE_SECONDS))
    writer.close(timeout=timeout)
