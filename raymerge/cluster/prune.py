"""keep top-k, the deleting side: removing the adapter files of merges out of the top k (their
merge.json stays, so any one can be rebuilt). `keep.py` decides which; this module deletes.

Usage::

    drop_files(plan, merge_id)  # while the run goes: pushed out of the top k
    settle_top_k(plan, writer)  # at the end: exactly the best k keep their files
"""

from __future__ import annotations

import logging

from raymerge.cluster.keep import final_top
from raymerge.merge.format import ADAPTER_FILES
from raymerge.store import commits, manifest, storage
from raymerge.sweep.plan import Plan
from raymerge.sweep.plan import objective as objective_of

log = logging.getLogger(__name__)


def settle_top_k(plan: Plan, writer: manifest.ManifestWriter) -> None:
    """keep top-k settled over every merge of the output: the files of every done merge outside
    the best k go, and its manifest line says so (no-op without `keep`)."""
    if plan.spec.keep is None:
        return
    references = manifest.read_references(plan.output, plan.spec.storage_options)
    objective = objective_of(plan.spec, references)
    top = final_top(writer.lines_so_far(), plan.spec.keep.top, objective)
    dropped = [
        line
        for line in writer.lines_so_far()
        if line.get("status") == "done" and line.get("kept", True)
        and line["merge_id"] not in top
    ]  # fmt: skip
    for line in dropped:
        drop_files(plan, line["merge_id"])
        writer.add({**line, "kept": False, "bytes": 0})


def drop_files(plan: Plan, merge_id: str) -> None:
    """Remove a merge's adapter files (its merge.json stays, saying so: it can be rebuilt).
    Best effort: a store that fails here leaves the merge whole, with its files."""
    options = plan.spec.storage_options
    try:
        commits.set_kept(plan.output, merge_id, False, options)
    except (*storage.errors(), ValueError) as exc:
        log.warning("merge %s keeps its files for now: %s", merge_id, storage.describe(exc))
        return
    folder = manifest.merge_dir(plan.output, merge_id)
    storage.remove([storage.join(folder, name) for name in ADAPTER_FILES], options)
