"""A race's records in the output: its journal of scored windows, and the manifest lines of the
merges it stopped.

    <output>/race/<window>.json   one per round: each merge's per-example scores on that window

A window's file is written once its round is scored (a committed round): a driver killed later
starts the next run from it, and scores again only what no file holds. The file names its
window and what its scores are of (the eval sets' digests, the inputs' digests); a file whose
header differs from the run's is not used.

Example:
    >>> window_name(7, 32, 64)
    'window-s7-32-64.json'
"""

from __future__ import annotations

import json
from typing import Any

from raymerge.errors import StorageError
from raymerge.store import storage
from raymerge.task import MergeTask, Status

RACE = "race"


def window_name(seed: int, start: int, stop: int) -> str:
    return f"window-s{seed}-{start}-{stop}.json"


def read_window(
    output: str, name: str, header: dict[str, Any], storage_options=None
) -> dict[str, dict]:
    """The per-example scores of each merge already scored on a window (merge id -> scores),
    if its file was written for the same examples and inputs; else none."""
    uri = storage.join(output, RACE, name)
    try:
        if not storage.exists(uri, storage_options):
            return {}
        data = json.loads(storage.read_bytes(uri, storage_options))
    except storage.errors() as exc:
        raise StorageError(
            f"could not read the race's journal {uri}: {storage.describe(exc)}"
        ) from exc
    except ValueError:  # cut short by a crash mid-write (local disk): score the round again
        return {}
    if not isinstance(data, dict) or data.get("header") != header:
        return {}
    return data.get("scores", {})


def write_window(
    output: str, name: str, header: dict[str, Any], scores: dict[str, dict], storage_options=None
) -> None:
    """Commit a round: every merge's per-example scores on its window."""
    data = json.dumps({"header": header, "scores": scores}, separators=(",", ":")).encode()
    uri = storage.join(output, RACE, name)
    try:
        storage.write_bytes(uri, data, storage_options)
    except storage.errors() as exc:
        raise StorageError(
            f"could not commit a race round to {uri}: {storage.describe(exc)}; run the same spec "
            "again once the store answers (committed rounds are kept)"
        ) from exc


def stopped_line(
    task: MergeTask,
    adapter_uris: dict[str, str],
    *,
    stopped: str,
    round_index: int,
    metrics: dict[str, Any],
    examples_seen: dict[str, int],
    objective: float,
    objective_stderr: float | None,
    standing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's line for a merge stopped after part of the examples (nothing written):
    its recipe, where it stopped, and its metrics (with stderr) on the examples it saw."""
    return {
        "merge_id": task.merge_id,
        "status": Status.STOPPED.value,
        "stopped": stopped,
        "round": round_index,
        "adapters": [{"name": n, "uri": adapter_uris[n]} for n in task.adapters],
        "weights": list(task.weights),
        "combination_type": task.combination_type,
        "params": task.params,
        "seed": task.seed,
        **({"trial": task.trial} if task.trial is not None else {}),
        **({"search_params": task.search_params} if task.search_params else {}),
        "examples_seen": examples_seen,
        "metrics": metrics,
        "objective": objective,
        "objective_stderr": objective_stderr,
        **({"standing": standing} if standing else {}),
    }
