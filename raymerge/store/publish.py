"""Publishing one merge to the output: its tensors laid out in PEFT's format, its files written
first (each atomically, with their digests), its merge.json last (the commit marker). A failure
removes what the merge wrote, so no half-written merge folder is ever left behind, and nothing
uncommitted is ever listed.

The weights file is written from the tensors' own buffers (a header, then each tensor's bytes):
the bytes are those safetensors writes, with no joined copy. Each stage's time is added to the
`stages` dict a caller passes (copy_to_host, serialise, hash, write, commit), in seconds.

Usage::

    staged = stage(merged)                      # in the merging thread: starts the host copy
    files = write_adapter(folder, staged, options, stages=stages)   # in a writer thread
    commit(output, folder, record, options, stages=stages)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raymerge.merge.format import CONFIG_FILE, WEIGHTS_FILE, adapter_files, config_bytes
from raymerge.merge.host import HostWeights, to_host
from raymerge.merge.tensors import MergedAdapter
from raymerge.store import manifest, storage

log = logging.getLogger(__name__)

CLEANUP_SECONDS = 30.0
"""How long undoing a failed write retries (the write spent its own retries already; whatever
is left is sorted out by the next run's check of the merge's files)."""


@dataclass
class StagedAdapter:
    """A merged adapter's files on their way out: the weights being copied to the host, the
    config's bytes."""

    weights: HostWeights
    config: bytes

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + len(self.config)

    def files(self) -> dict[str, Sequence]:
        """File name -> its buffers, in order (waits for the host copy)."""
        return {WEIGHTS_FILE: self.weights.parts(), CONFIG_FILE: [self.config]}


def stage(merged: MergedAdapter, stages: dict[str, float] | None = None) -> StagedAdapter:
    """Start the merged adapter's copy to the host and lay out its files."""
    started = time.perf_counter()
    staged = StagedAdapter(to_host(merged.tensors, merged.file), config_bytes(merged.config))
    _add(stages, "serialise", time.perf_counter() - started)
    return staged


def serialise(merged: MergedAdapter) -> dict[str, bytes]:
    """The merged adapter's files (name -> bytes), as PEFT's save_pretrained writes them."""
    return adapter_files(merged.tensors, merged.config)


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """File name -> sha256, as merge.json records them."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def write_adapter(
    folder: str,
    staged: StagedAdapter,
    storage_options=None,
    *,
    keep: bool = True,
    upload: storage.Upload = storage.DEFAULT_UPLOAD,
    stages: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write a staged adapter's files (see `write_files`)."""
    started = time.perf_counter()
    contents = staged.files()
    _add(stages, "copy_to_host", time.perf_counter() - started)
    return write_files(folder, contents, storage_options, keep=keep, upload=upload, stages=stages)


def write_files(
    folder: str,
    contents: dict[str, bytes | Sequence],
    storage_options=None,
    *,
    keep: bool = True,
    upload: storage.Upload = storage.DEFAULT_UPLOAD,
    stages: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the adapter files (each bytes, or buffers to write one after the other); returns
    each one's size and sha256. With `keep=False` (keep top-k: the merge did not make the cut)
    nothing is written, and the digests say what the files would have held (`kept: false`).

    On a local disk each block is hashed just before it is written (one pass over the bytes);
    an upload reads its parts more than once (concurrently, and again on a retry), so the digests
    are taken first. Either way the `hash` stage is the hashing alone."""
    parts = {name: [data] if isinstance(data, bytes) else data for name, data in contents.items()}
    if not keep or storage.is_remote(folder):
        started = time.perf_counter()
        files = {name: _digest(buffers) for name, buffers in parts.items()}
        _add(stages, "hash", time.perf_counter() - started)
        if not keep:
            for entry in files.values():
                entry["kept"] = False
            return files
        hashing = None
    else:
        hashing = _Hashing()
    started = time.perf_counter()
    try:  # one file after the other: concurrency is the writer threads' and each file's parts'
        for name, buffers in parts.items():
            on_block = hashing.file(name) if hashing else None
            storage.write(storage.join(folder, name), buffers, storage_options, upload, on_block)
        if hashing:
            files = hashing.files()
    except BaseException:
        remove(folder, dict.fromkeys(parts), storage_options)
        raise
    finally:
        hashed = hashing.seconds if hashing else 0.0
        _add(stages, "write", time.perf_counter() - started - hashed)
        if hashing:
            _add(stages, "hash", hashed)
    return files


class _Hashing:
    """Each file's size and sha256, from the blocks a local write hands over as it writes."""

    def __init__(self):
        self.seconds = 0.0
        self._digests: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}

    def file(self, name: str):
        digest = self._digests[name] = hashlib.sha256()
        self._sizes[name] = 0

        def on_block(block: memoryview) -> None:
            started = time.perf_counter()
            _update(digest, block)
            self._sizes[name] += block.nbytes
            self.seconds += time.perf_counter() - started

        return on_block

    def files(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"bytes": self._sizes[name], "sha256": digest.hexdigest()}
            for name, digest in self._digests.items()
        }


def commit(
    output: str,
    folder: str,
    record: dict[str, Any],
    storage_options=None,
    stages: dict[str, float] | None = None,
) -> None:
    """Write merge.json, which makes the merge done; if that fails, remove its files too."""
    started = time.perf_counter()
    try:
        manifest.commit_merge(output, record, storage_options)
    except BaseException:
        remove(folder, record.get("files", {}), storage_options)
        raise
    finally:
        _add(stages, "commit", time.perf_counter() - started)


def remove(folder: str, files: dict[str, Any], storage_options=None) -> None:
    """Undo a merge whose commit failed or whose outcome is unknown (merge.json's PUT may have
    landed although its answer was lost). merge.json goes first, and the files only once it is
    confirmed gone: whatever fails when, a merge.json is never left without its files. If it
    cannot be confirmed gone, the files stay (the merge may be committed: resume and retries
    check its files against it) and the next run sorts it out."""
    try:
        with storage.deadline(CLEANUP_SECONDS):
            storage.delete(storage.join(folder, manifest.MERGE_JSON), storage_options)
    except storage.errors() as exc:
        log.warning(
            "could not remove %s/%s after a failed write (%s); its files are kept, and the next "
            "run checks them against it",
            folder,
            manifest.MERGE_JSON,
            storage.describe(exc),
        )
        return
    with contextlib.suppress(*storage.errors()):
        storage.remove([storage.join(folder, name) for name in files], storage_options)
    if not storage.is_remote(folder):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _digest(buffers: Sequence) -> dict[str, Any]:
    digest = hashlib.sha256()
    for buffer in buffers:
        _update(digest, buffer)
    return {"bytes": sum(memoryview(b).nbytes for b in buffers), "sha256": digest.hexdigest()}


def _update(digest, buffer) -> None:
    """Every byte a file's digest covers goes through here."""
    digest.update(buffer)  # hashlib releases the GIL on large buffers


def _add(stages: dict[str, float] | None, stage_name: str, seconds: float) -> None:
    if stages is not None:
        stages[stage_name] = stages.get(stage_name, 0.0) + seconds
