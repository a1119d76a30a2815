"""Resume: before any cluster work, what the output already holds. Merges committed by earlier
runs (merge.json present) are skipped, after checking they were made from the current inputs;
their manifest lines are carried over into this run's manifest (rebuilt where a killed driver
lost them).

Usage::

    out = prepare_output(plan, rebuild_changed=False)
    tasks = pending_tasks(plan, out.committed, summary)  # the rest, counted as skipped
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raymerge.cluster.summary import RunSummary
from raymerge.errors import StorageError
from raymerge.merge.format import ADAPTER_FILES
from raymerge.store import commits, inputs, manifest, publish, storage
from raymerge.sweep.plan import Plan
from raymerge.task import MergeTask, Status

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What a run starts from, in its output."""

    committed: set[str]
    """The merge ids committed by earlier runs (and made from the current inputs)."""
    digests: dict[str, str]
    """The weights digest of each adapter, by name."""
    writer: manifest.ManifestWriter
    """This run's manifest, with the lines of earlier runs carried over."""
    trial_lines: list[dict[str, Any]]
    """Done search trials of earlier runs (told to the search again)."""


def prepare_output(plan: Plan, rebuild_changed: bool) -> Output:
    """Before any cluster work: the output is writable, its merges were made from these inputs,
    and the manifest lines of earlier runs are carried over (rebuilt where missing).

    Raises StorageError when the output cannot be read or written."""
    try:
        return _prepare_output(plan, rebuild_changed)
    except storage.errors() as exc:
        raise StorageError(
            f"the output {plan.output} cannot be read or written: {storage.describe(exc)}; "
            "check the location, its permissions and free space"
        ) from exc


def _prepare_output(plan: Plan, rebuild_changed: bool) -> Output:
    options = plan.spec.storage_options
    storage.check_writable(plan.output, options)
    committed = _checked_commits(plan)
    inputs.check_base_unchanged(plan, committed)
    digests = inputs.current_digests(plan)
    redo = inputs.check_unchanged(plan, digests, committed, rebuild_changed)
    committed -= redo
    manifest.write_inputs(plan.output, inputs.inputs_record(plan, digests), options)
    evaluate = plan.spec.evaluate
    if evaluate is not None:
        evaluation = {
            "objective": evaluate.objective_terms(),
            "normalize": evaluate.objective_normalize(),
            "sets": {name: entry["kind"] for name, entry in plan.eval_sets.items()},
            "lm_eval_tasks": evaluate.lm_eval.tasks if evaluate.lm_eval else [],
        }
        manifest.write_evaluation(plan.output, evaluation, options)
    writer = manifest.ManifestWriter(plan.output, options)
    trial_lines: list[dict[str, Any]] = []

    def carried():
        for line in carried_lines(plan, committed):
            if line.get("trial") is not None:
                trial_lines.append(line)
            yield line

    writer.carry(carried())
    weights = {name: d["weights_sha256"] for name, d in digests.items()}
    return Output(committed, weights, writer, trial_lines)


def _checked_commits(plan: Plan) -> set[str]:
    """The merges committed by earlier runs whose files are all there as their merge.json
    says; one that lost or changed a file (a deleted folder, a truncated file, a write whose
    outcome was unknown) is uncommitted, named, and made again."""
    options = plan.spec.storage_options
    found = commits.committed_merges(plan.output, options)
    for merge_id in _dropped_by_keep(plan, set(found.broken)):
        # keep top-k of an earlier version removed its files without marking merge.json
        commits.set_kept(plan.output, merge_id, False, options)
        found.ids.add(merge_id)
        del found.broken[merge_id]
    for merge_id, problem in sorted(found.broken.items()):
        log.warning("merge %s is made again: %s", merge_id, problem)
        folder = manifest.merge_dir(plan.output, merge_id)
        publish.remove(folder, dict.fromkeys(ADAPTER_FILES), options)
    return found.ids


def _dropped_by_keep(plan: Plan, merge_ids: set[str]) -> set[str]:
    """Those of `merge_ids` whose last done manifest line says keep top-k removed their files."""
    if not merge_ids:
        return set()
    kept: dict[str, bool] = {}
    for line in manifest.iter_lines(plan.output, plan.spec.storage_options):
        if line.get("merge_id") in merge_ids and line.get("status") == Status.DONE:
            kept[line["merge_id"]] = line.get("kept", True)
    return {merge_id for merge_id, files_kept in kept.items() if not files_kept}


def carried_lines(plan: Plan, committed: set[str]) -> Iterator[dict[str, Any]]:
    """The manifest lines of merges done by earlier runs (streamed; the last done line of each,
    as keep top-k appends a later one), and of search candidates they pruned; done ones lost
    with a killed driver are rebuilt from their merge.json."""
    options = plan.spec.storage_options
    last: dict[str, int] = {}  # merge id -> the position of its last done line
    pruned: dict[str, dict[str, Any]] = {}  # search candidates a pruner stopped (not committed)
    for position, line in enumerate(manifest.iter_lines(plan.output, options)):
        merge_id = line.get("merge_id")
        if line.get("status") == Status.DONE and merge_id in committed:
            last[merge_id] = position
        elif line.get("stopped") == "pruned" and merge_id not in committed:
            pruned[merge_id] = line
    wanted = set(last.values())
    for position, line in enumerate(manifest.iter_lines(plan.output, options)):
        if position in wanted:
            yield line
    yield from pruned.values()  # a race's stopped merges are listed again by its replay
    missing = committed - set(last)  # committed after the last manifest flush of a killed run
    for record in manifest.read_records(plan.output, sorted(missing), options):
        yield manifest.manifest_line(plan.output, record)


def pending_tasks(plan: Plan, committed: set[str], summary: RunSummary) -> Iterator[MergeTask]:
    """The plan's tasks that are not committed yet (counting the others as skipped)."""
    for task in plan.tasks():
        if task.merge_id in committed:
            summary.skipped += 1
        else:
            yield task
