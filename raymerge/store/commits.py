"""When a merge counts as made: its merge.json exists and every file it lists is there, with the
recorded size. Resume and retried tasks ask here, never the marker alone (a commit whose outcome
was unknown, a deleted folder, a truncated file); keep top-k and materialize record here which
files a merge keeps.

Usage::

    record = read_committed(output, merge_id)    # None unless whole
    committed_merges(output).ids                 # every whole merge, one listing
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raymerge.store import manifest, storage


def read_record(output: str, merge_id: str, storage_options=None) -> dict[str, Any] | None:
    """A merge's merge.json record as it is (None if there is none), whether or not its files
    are all there: what `materialize` rebuilds from."""
    uri = manifest.record_uri(output, merge_id)
    if not storage.exists(uri, storage_options):
        return None
    return json.loads(storage.read_bytes(uri, storage_options))


def read_committed(output: str, merge_id: str, storage_options=None) -> dict[str, Any] | None:
    """A merge's merge.json record if it is committed (every file it lists is there, with the
    recorded size), else None."""
    record = read_record(output, merge_id, storage_options)
    if record is None:
        return None
    sizes = storage.file_sizes(manifest.merge_dir(output, merge_id), storage_options)
    return None if file_problems(output, record, sizes) else record


def file_problems(output: str, record: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    """What is wrong with a merge's files against its record: each kept file must be in `sizes`
    (URI -> bytes, a listing) with the size the record says. Empty: the merge is whole."""
    folder = manifest.merge_dir(output, record["merge_id"])
    problems = []
    for name, entry in record.get("files", {}).items():
        if not entry.get("kept", True):
            continue
        found = sizes.get(storage.join(folder, name))
        if found is None:
            problems.append(f"{name} is missing")
        elif found != entry["bytes"]:
            problems.append(f"{name} has {found} bytes where merge.json says {entry['bytes']}")
    return problems


def set_kept(output: str, merge_id: str, kept: bool, storage_options=None) -> None:
    """Record in a merge's merge.json whether its files are kept: before they are deleted (keep
    top-k), or after they are written back (materialize). A merge.json never lists a file that
    is not there."""
    record = read_record(output, merge_id, storage_options)
    if record is None:
        return
    for entry in record.get("files", {}).values():
        entry["kept"] = kept
    manifest.commit_merge(output, record, storage_options)  # the record, rewritten whole


@dataclass
class Committed:
    """What an output's merge folders hold: the merges whose merge.json has every file it lists
    (at the recorded sizes), and those whose merge.json does not (merge id -> what is wrong)."""

    ids: set[str]
    broken: dict[str, str]


def committed_merges(output: str, storage_options=None) -> Committed:
    """Every merge.json under `output`, checked against its files: one listing (with sizes) and
    the records, read concurrently in chunks; memory holds ids, not records."""
    sizes = storage.file_sizes(storage.join(output, manifest.MERGES), storage_options)
    marker = f"/{manifest.MERGE_JSON}"
    folders = (uri[: -len(marker)].rsplit("/", 1)[-1] for uri in sizes if uri.endswith(marker))
    found = sorted(merge_id for merge_id in folders if manifest.is_merge_id(merge_id))
    committed = Committed(set(), {})
    for record in manifest.read_records(output, found, storage_options):
        if problems := file_problems(output, record, sizes):
            committed.broken[record["merge_id"]] = "; ".join(problems)
        else:
            committed.ids.add(record["merge_id"])
    return committed


def committed_merge_ids(output: str, storage_options=None) -> set[str]:
    """Ids of the merges committed under `output`: merge.json there, and every file it lists."""
    return committed_merges(output, storage_options).ids
