"""The output format, read and written in one place.

    <output>/merges/<merge_id>/adapter_model.safetensors
    <output>/merges/<merge_id>/adapter_config.json
    <output>/merges/<merge_id>/merge.json     written last: the commit marker
    <output>/manifest.jsonl                   one line per merge (status done or failed)
    <output>/summary.json                     the run's figures

A merge folder without merge.json is incomplete: it is never listed and is redone on resume.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raymerge import storage
from raymerge.plan import MergeTask

MERGES = "merges"
MERGE_JSON = "merge.json"
MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
REFERENCES = "references.json"
MERGE_ID = re.compile(r"[0-9a-f]{16}")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
"""The files of a merged adapter, as PEFT's save_pretrained writes them."""


def merge_dir(output: str, merge_id: str) -> str:
    """Where merge `merge_id` lives. Ids are hex hashes, so no name can reach outside `output`."""
    if not MERGE_ID.fullmatch(merge_id):
        raise ValueError(f"{merge_id!r} is not a merge id (16 hex digits)")
    return storage.join(output, MERGES, merge_id)


def merge_record(
    task: MergeTask,
    *,
    inputs: list[dict[str, Any]],
    base_model: str,
    engine: str,
    engine_fallback: str | None = None,
    metrics: dict[str, dict[str, float]] | None = None,
    compute_dtype: str,
    files: dict[str, dict[str, Any]],
    seconds: float,
    worker: dict[str, Any],
    versions: dict[str, str],
) -> dict[str, Any]:
    """The content of merge.json: what the merged adapter is, and how it was made.

    `inputs` holds, per input adapter in merge order, its name, uri and the sha256 of its
    weights file and config.
    """
    return {
        "merge_id": task.merge_id,
        "status": "done",
        "adapters": inputs,
        "weights": list(task.weights),
        "combination_type": task.combination_type,
        "params": task.params,
        "seed": task.seed,
        "merge_seed": task.merge_seed,
        "compute_dtype": compute_dtype,
        "output_dtype": task.output_dtype,
        "base_model": base_model,
        "engine": engine,
        **({"engine_fallback": engine_fallback} if engine_fallback else {}),
        "files": files,
        **({"metrics": metrics} if metrics else {}),
        "seconds": round(seconds, 4),
        "worker": worker,
        "versions": versions,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def commit_merge(output: str, record: dict[str, Any], storage_options=None) -> None:
    """Write merge.json: the last write of a merge, after which it counts as done."""
    uri = storage.join(merge_dir(output, record["merge_id"]), MERGE_JSON)
    storage.write_bytes(uri, json.dumps(record, indent=2).encode(), storage_options)


def read_committed(output: str, merge_id: str, storage_options=None) -> dict[str, Any] | None:
    """A merge's merge.json record if it is committed, else None."""
    uri = storage.join(merge_dir(output, merge_id), MERGE_JSON)
    if not storage.exists(uri, storage_options):
        return None
    return json.loads(storage.read_bytes(uri, storage_options))


def manifest_line(
    output: str,
    record: dict[str, Any],
    adapter_loads: int | None = None,
    load_seconds: float | None = None,
) -> dict[str, Any]:
    """The manifest's line for a committed merge, from its merge.json record.

    `adapter_loads` is how many input adapters the worker had to load for this merge, and
    `load_seconds` how long that took (part of `seconds`).
    """
    keys = ("merge_id", "status", "weights", "combination_type", "params", "seed")
    return {
        **{k: record[k] for k in keys},
        "adapters": [{"name": a["name"], "uri": a["uri"]} for a in record["adapters"]],
        "path": merge_dir(output, record["merge_id"]),
        "seconds": record["seconds"],
        "worker": record["worker"]["index"],
        "adapter_loads": adapter_loads,
        "load_seconds": None if load_seconds is None else round(load_seconds, 4),
        "bytes": sum(f["bytes"] for f in record["files"].values()),
        **({"metrics": record["metrics"]} if "metrics" in record else {}),
    }


def failure_line(task: MergeTask, adapter_uris: dict[str, str], error: str) -> dict[str, Any]:
    """The manifest's line for a merge that failed (nothing of it is committed)."""
    return {
        "merge_id": task.merge_id,
        "status": "failed",
        "adapters": [{"name": n, "uri": adapter_uris[n]} for n in task.adapters],
        "weights": list(task.weights),
        "combination_type": task.combination_type,
        "params": task.params,
        "seed": task.seed,
        "error": error,
    }


def committed_merge_ids(output: str, storage_options=None) -> set[str]:
    """Ids of the merges whose merge.json exists under `output` (one listing)."""
    marker = f"/{MERGE_JSON}"
    found = (
        uri[: -len(marker)].rsplit("/", 1)[-1]
        for uri in storage.find(storage.join(output, MERGES), storage_options)
        if uri.endswith(marker)
    )
    return {merge_id for merge_id in found if MERGE_ID.fullmatch(merge_id)}


def read_manifest(output: str, storage_options=None) -> list[dict[str, Any]]:
    """The manifest's lines (empty if there is none yet)."""
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri, storage_options):
        return []
    text = storage.read_bytes(uri, storage_options).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(output: str, merge_ids: Iterable[str], storage_options=None) -> list[dict]:
    """The merge.json records of some committed merges (fetched concurrently on S3)."""
    uris = [storage.join(merge_dir(output, m), MERGE_JSON) for m in merge_ids]
    return [json.loads(data) for data in storage.read_many(uris, storage_options).values()]


def write_references(output: str, references: dict[str, Any], storage_options=None) -> None:
    """The base model's and each input adapter's own scores, the yardstick for every merge."""
    data = json.dumps(references, indent=2).encode()
    storage.write_bytes(storage.join(output, REFERENCES), data, storage_options)


def read_references(output: str, storage_options=None) -> dict[str, Any] | None:
    uri = storage.join(output, REFERENCES)
    if not storage.exists(uri, storage_options):
        return None
    return json.loads(storage.read_bytes(uri, storage_options))


def write_summary(output: str, summary: dict[str, Any], storage_options=None) -> None:
    data = json.dumps(summary, indent=2).encode()
    storage.write_bytes(storage.join(output, SUMMARY), data, storage_options)


class ManifestWriter:
    """Collects manifest lines in a local spool file and publishes the whole manifest on flush.

    Object stores cannot append, so the manifest is republished whole (atomically) at each flush.
    The spool keeps driver memory flat however many merges the sweep has.
    """

    def __init__(self, output: str, storage_options=None):
        self._uri = storage.join(output, MANIFEST)
        self._options = storage_options
        fd, name = tempfile.mkstemp(prefix="raymerge-manifest-", suffix=".jsonl")
        self._spool_path = Path(name)
        self._spool = os.fdopen(fd, "w")
        self.lines = 0

    def add(self, line: dict[str, Any]) -> None:
        self._spool.write(json.dumps(line) + "\n")
        self.lines += 1

    def flush(self) -> None:
        self._spool.flush()
        storage.upload_file(self._spool_path, self._uri, self._options)

    def close(self) -> None:
        self.flush()
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
