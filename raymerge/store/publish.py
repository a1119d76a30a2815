"""Publishing one merge to the output: its tensors serialised in PEFT's format, its files written
first (each atomically, with their digests), its merge.json last (the commit marker). A failure
removes what the merge wrote, so no half-written merge folder is ever left behind, and nothing
uncommitted is ever listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

from raymerge.merge.format import adapter_files
from raymerge.merge.tensors import MergedAdapter
from raymerge.store import manifest, storage


def serialise(merged: MergedAdapter) -> dict[str, bytes]:
    """The merged adapter's files (name -> bytes), as PEFT's save_pretrained writes them."""
    return adapter_files(merged.tensors, merged.config)


def digests(files: dict[str, bytes]) -> dict[str, str]:
    """File name -> sha256, as merge.json records them."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def write_adapter(
    folder: str, merged: MergedAdapter, storage_options=None, *, keep: bool = True
) -> dict[str, dict[str, Any]]:
    """Serialise the merged adapter and write its files (see `write_files`)."""
    return write_files(folder, serialise(merged), storage_options, keep=keep)


def write_files(
    folder: str, contents: dict[str, bytes], storage_options=None, *, keep: bool = True
) -> dict[str, dict[str, Any]]:
    """Write the adapter files; returns each one's size and sha256. With `keep=False` (keep
    top-k: the merge did not make the cut) nothing is written, and the digests say what the
    files would have held (`kept: false`)."""
    files: dict[str, dict[str, Any]] = {}
    for name, data in contents.items():
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if not keep:
            files[name]["kept"] = False
            continue
        try:
            storage.write_bytes(storage.join(folder, name), data, storage_options)
        except BaseException:
            remove(folder, files, storage_options)
            raise
    return files


def commit(output: str, folder: str, record: dict[str, Any], storage_options=None) -> None:
    """Write merge.json, which makes the merge done; if that fails, remove its files too."""
    try:
        manifest.commit_merge(output, record, storage_options)
    except BaseException:
        remove(folder, record.get("files", {}), storage_options)
        raise


def remove(folder: str, files: dict[str, Any], storage_options=None) -> None:
    """Best effort: the files of one merge, its merge.json and (locally) its empty folder."""
    uris = [storage.join(folder, name) for name in [*files, manifest.MERGE_JSON]]
    with contextlib.suppress(*storage.errors()):
        storage.remove(uris, storage_options)
    if not storage.is_remote(folder):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
