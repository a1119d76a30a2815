"""The output format, read and written in one place.

    <output>/merges/<merge_id>/adapter_model.safetensors
    <output>/merges/<merge_id>/adapter_config.json
    <output>/merges/<merge_id>/merge.json     written last: the commit marker
    <output>/manifest.jsonl                   one line per merge (status done or failed)
    <output>/manifest-segments/*.jsonl        lines of a run not compacted yet (append-only)
    <output>/inputs.json                      the digests of the inputs every merge was made from
    <output>/references.json, evaluation.json  scores of the base model and inputs; the objective
    <output>/summary.json                     the run's figures

A merge folder without merge.json is incomplete: it is never listed and is redone on resume.
Object stores cannot append, so a run publishes its new manifest lines as new segment objects
(bytes uploaded over a sweep: O(merges)), and compacts everything into manifest.jsonl once, when
it ends; a run that was killed leaves segments, which every reader includes and the next run
compacts.

Example:
    >>> line = {"merge_id": "0123456789abcdef", "status": "done"}
    >>> merge_dir("s3://bucket/run", line["merge_id"])
    's3://bucket/run/merges/0123456789abcdef'
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raymerge.errors import StorageError
from raymerge.store import storage
from raymerge.task import MergeTask, Status

log = logging.getLogger(__name__)

MERGES = "merges"
MERGE_JSON = "merge.json"
MANIFEST = "manifest.jsonl"
SEGMENTS = "manifest-segments"
INPUTS = "inputs.json"
SUMMARY = "summary.json"
REFERENCES = "references.json"
EVALUATION = "evaluation.json"
RECORDS_PER_READ = 1000
SEGMENT_UPLOAD_SECONDS = 30.0
"""How long one background segment upload keeps retrying (the next flush takes its lines)."""


def is_merge_id(value: str) -> bool:
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def merge_dir(output: str, merge_id: str) -> str:
    """Where merge `merge_id` lives. Ids are hex hashes, so no name can reach outside `output`."""
    if not is_merge_id(merge_id):
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
    examples: dict[str, dict[str, list]] | None = None,
    compute_dtype: str,
    files: dict[str, dict[str, Any]],
    seconds: float,
    worker: dict[str, Any],
    versions: dict[str, str],
    warnings: list[str] | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """The content of merge.json: what the merged adapter is, and how it was made.

    `inputs` holds, per input adapter in merge order, its name, uri and the sha256 of its
    weights file and config. `files` are the merged adapter's files with their sizes and digests
    (with `kept: false` when the files were not written, keep-top-k). `examples` are the
    per-example scores behind `metrics` (for paired comparisons; not copied to the manifest).
    """
    return {
        "merge_id": task.merge_id,
        "status": Status.DONE.value,
        "adapters": inputs,
        "weights": list(task.weights),
        "combination_type": task.combination_type,
        "params": task.params,
        "seed": task.seed,
        "merge_seed": task.merge_seed,
        **({"trial": task.trial} if task.trial is not None else {}),
        **({"search_params": task.search_params} if task.search_params else {}),
        "compute_dtype": compute_dtype,
        "output_dtype": task.output_dtype,
        "base_model": base_model,
        "task_type": task_type,
        "engine": engine,
        **({"engine_fallback": engine_fallback} if engine_fallback else {}),
        "files": files,
        **({"metrics": metrics} if metrics else {}),
        **({"examples": examples} if examples else {}),
        "warnings": warnings or [],
        "seconds": round(seconds, 4),
        "worker": worker,
        "versions": versions,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def commit_merge(output: str, record: dict[str, Any], storage_options=None) -> None:
    """Write merge.json: the last write of a merge, after which it counts as done."""
    storage.write_bytes(record_uri(output, record["merge_id"]), _json(record), storage_options)


def record_uri(output: str, merge_id: str) -> str:
    return storage.join(merge_dir(output, merge_id), MERGE_JSON)


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
        **({"trial": record["trial"]} if "trial" in record else {}),
        **({"search_params": record["search_params"]} if "search_params" in record else {}),
        "adapters": [
            {"name": a["name"], "uri": a["uri"], "weights_sha256": a.get("weights_sha256")}
            for a in record["adapters"]
        ],
        "path": merge_dir(output, record["merge_id"]),
        "kept": all(f.get("kept", True) for f in record["files"].values()),
        "seconds": record["seconds"],
        "worker": record["worker"]["index"],
        "adapter_loads": adapter_loads,
        "load_seconds": None if load_seconds is None else round(load_seconds, 4),
        "bytes": sum(f["bytes"] for f in record["files"].values() if f.get("kept", True)),
        **({"metrics": record["metrics"]} if "metrics" in record else {}),
    }


def failure_line(task: MergeTask, adapter_uris: dict[str, str], error: str) -> dict[str, Any]:
    """The manifest's line for a merge that failed (nothing of it is committed)."""
    return {
        "merge_id": task.merge_id,
        "status": Status.FAILED.value,
        "adapters": [{"name": n, "uri": adapter_uris[n]} for n in task.adapters],
        "weights": list(task.weights),
        "combination_type": task.combination_type,
        "params": task.params,
        "seed": task.seed,
        **({"trial": task.trial} if task.trial is not None else {}),
        **({"search_params": task.search_params} if task.search_params else {}),
        "error": error,
    }


def manifest_sources(output: str, storage_options=None) -> list[str]:
    """manifest.jsonl (if any) and the segments runs left, oldest first."""
    sources = []
    compacted = storage.join(output, MANIFEST)
    if storage.exists(compacted, storage_options):
        sources.append(compacted)
    segments = storage.find(storage.join(output, SEGMENTS), storage_options)
    sources += sorted(uri for uri in segments if uri.endswith(".jsonl"))
    return sources


def iter_lines(output: str, storage_options=None) -> Iterator[dict[str, Any]]:
    """Every line of the manifest and of its segments, streamed, in order (a merge may appear
    more than once: failed in one run, done in a later one)."""
    for uri in manifest_sources(output, storage_options):
        for text in storage.iter_text_lines(uri, storage_options):
            if text.strip():
                yield json.loads(text)


def read_manifest(output: str, storage_options=None) -> list[dict[str, Any]]:
    """One line per merge (a done line over a failed one, else the latest), in first-seen
    order; empty if there is no manifest yet."""
    latest: dict[str, dict[str, Any]] = {}
    for line in iter_lines(output, storage_options):
        merge_id = line.get("merge_id")
        previous = latest.get(merge_id)
        if previous is None or line.get("status") == Status.DONE or previous["status"] != "done":
            latest[merge_id] = line
    return list(latest.values())


def read_records(output: str, merge_ids: Iterable[str], storage_options=None) -> Iterator[dict]:
    """The merge.json records of some committed merges (fetched concurrently on S3, in chunks)."""
    ids = iter(merge_ids)
    while chunk := list(itertools.islice(ids, RECORDS_PER_READ)):
        uris = [record_uri(output, m) for m in chunk]
        for data in storage.read_many(uris, storage_options).values():
            yield json.loads(data)


def write_references(output: str, references: dict[str, Any], storage_options=None) -> None:
    """The base model's and each input adapter's own scores, the yardstick for every merge."""
    storage.write_bytes(storage.join(output, REFERENCES), _json(references), storage_options)


def read_references(output: str, storage_options=None) -> dict[str, Any] | None:
    return _read_json(storage.join(output, REFERENCES), storage_options)


def write_evaluation(output: str, evaluation: dict[str, Any], storage_options=None) -> None:
    """How merges are scored: the objective and each eval set's kind (the report reads it)."""
    storage.write_bytes(storage.join(output, EVALUATION), _json(evaluation), storage_options)


def read_evaluation(output: str, storage_options=None) -> dict[str, Any] | None:
    return _read_json(storage.join(output, EVALUATION), storage_options)


def write_inputs(output: str, inputs: dict[str, Any], storage_options=None) -> None:
    """The digests of the inputs the output's merges are made from."""
    storage.write_bytes(storage.join(output, INPUTS), _json(inputs), storage_options)


def read_inputs(output: str, storage_options=None) -> dict[str, Any] | None:
    return _read_json(storage.join(output, INPUTS), storage_options)


def write_summary(output: str, summary: dict[str, Any], storage_options=None) -> None:
    storage.write_bytes(storage.join(output, SUMMARY), _json(summary), storage_options)


def read_summary(output: str, storage_options=None) -> dict[str, Any] | None:
    return _read_json(storage.join(output, SUMMARY), storage_options)


def _read_json(uri: str, storage_options) -> dict[str, Any] | None:
    if not storage.exists(uri, storage_options):
        return None
    return json.loads(storage.read_bytes(uri, storage_options))


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()


class ManifestWriter:
    """The manifest of one run: lines go to a local spool file; `flush` publishes the lines added
    since the last flush as one new segment object, in a background thread (dispatch never waits
    for the store); `close` compacts everything into manifest.jsonl and removes the segments.

    Driver memory stays flat however many merges the sweep has: lines live in the spool file.
    """

    def __init__(self, output: str, storage_options=None, run_id: str | None = None):
        self.output = output
        self._options = storage_options
        self.run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.on_add: Callable[[dict[str, Any]], None] | None = None
        """Called with every line added (a tracker: it must not block)."""
        fd, name = tempfile.mkstemp(prefix="raymerge-manifest-", suffix=".jsonl")
        self._spool_path = Path(name)
        self._spool = os.fdopen(fd, "w")
        self._published = 0  # spool bytes already in a segment (or carried over: listed already)
        self._segments = itertools.count()
        self._lock = threading.Lock()
        self._uploads = ThreadPoolExecutor(1, thread_name_prefix="raymerge-manifest")
        self._pending: Future | None = None
        self.lines = 0
        self.bytes_uploaded = 0
        self.flush_errors = 0

    def add(self, line: dict[str, Any]) -> None:
        with self._lock:
            self._spool.write(json.dumps(line) + "\n")
            self.lines += 1
        if self.on_add is not None:
            self.on_add(line)

    def carry(self, lines: Iterable[dict[str, Any]]) -> None:
        """Lines already listed by an earlier run: kept in the compacted manifest, not uploaded
        again as a segment."""
        for line in lines:
            self.add(line)
        with self._lock:
            self._spool.flush()
            self._published = self._spool.tell()

    def lines_so_far(self) -> Iterator[dict[str, Any]]:
        """Every line added (carried ones included), read back from the spool."""
        with self._lock:
            self._spool.flush()
        with open(self._spool_path) as spool:
            for text in spool:
                yield json.loads(text)

    def flush(self) -> None:
        """Publish the new lines as a segment, in the background; never blocks, never raises (a
        failed upload is retried by the next flush, and reported at close)."""
        if self._pending is not None and not self._pending.done():
            return  # the store is slow: the next flush takes these lines too
        self._pending = self._uploads.submit(self._publish_new_lines)

    def wait_for_flush(self, timeout: float | None = None) -> None:
        """Wait until the segment upload in flight (if any) has ended, published or not."""
        if self._pending is not None:
            with contextlib.suppress(TimeoutError):
                self._pending.result(timeout=timeout)

    def _publish_new_lines(self) -> None:
        with self._lock:
            self._spool.flush()
            end = self._spool.tell()
        if end == self._published:
            return
        with open(self._spool_path, "rb") as spool:
            spool.seek(self._published)
            data = spool.read(end - self._published)
        name = f"{self.run_id}-{next(self._segments):06d}.jsonl"
        try:
            with storage.deadline(SEGMENT_UPLOAD_SECONDS):
                storage.write_bytes(storage.join(self.output, SEGMENTS, name), data, self._options)
        except storage.errors() as exc:  # retried at the next flush
            self.flush_errors += 1
            log.warning(
                "could not publish manifest lines (retried later): %s", storage.describe(exc)
            )
            return
        self.bytes_uploaded += len(data)
        self._published = end

    def close(self, timeout: float = 300.0) -> None:
        """Compact every line listed so far (earlier runs' included) into manifest.jsonl and
        remove the segments; retries a store that does not answer for up to `timeout` seconds,
        then raises StorageError naming the file (the merges themselves are committed: a rerun
        rebuilds the manifest from them)."""
        deadline = time.monotonic() + timeout
        self.wait_for_flush(timeout)  # a segment upload still retrying: give it the same time
        self._uploads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._spool.close()
        target = storage.join(self.output, MANIFEST)
        try:
            while True:
                try:
                    with storage.deadline(max(0.0, deadline - time.monotonic())):
                        sources = manifest_sources(self.output, self._options)
                        storage.write(target, self._spool_path, self._options)
                        self.bytes_uploaded += self._spool_path.stat().st_size
                        storage.remove([uri for uri in sources if uri != target], self._options)
                    return
                except storage.errors() as exc:
                    if storage.is_fatal(exc) or time.monotonic() > deadline:
                        raise StorageError(
                            f"could not write {target}: {storage.describe(exc)}. Every merge "
                            "listed as done is committed (its merge.json is written); run the "
                            "same spec again to rebuild the manifest"
                        ) from exc
                    log.warning("manifest not written yet, retrying: %s", storage.describe(exc))
                    time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        finally:
            self._spool_path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Stop without compacting (the segments stay for the next run)."""
        self._uploads.shutdown(wait=True)
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
