"""The node-local cache of remote inputs: an adapter or base model on S3 is downloaded once per
node and read from local disk, fetched again only when the remote files changed.

Usage::

    folder = local_copy("s3://bucket/adapters/math", storage_options)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from raymerge.store import hub, storage


def cache_dir() -> Path:
    """Node-local cache of remote inputs (`RAYMERGE_CACHE`, default ~/.cache/raymerge)."""
    return Path(os.environ.get("RAYMERGE_CACHE", Path.home() / ".cache" / "raymerge"))


def local_copy(
    uri: str, storage_options: dict[str, Any] | None = None, *, model: bool = False
) -> Path:
    """A local folder holding `uri`'s files: the folder itself if local, else a node-local cache.

    Remote folders are downloaded once per node: workers on one node share the copy (a file lock
    serialises them), and it is fetched again only if the remote files changed (size or ETag).
    A Hub location is read through the Hub's own cache: an adapter's files, or with `model` a
    base model's.
    """
    if hub.is_hub(uri):
        files = hub.MODEL_FILES if model else hub.ADAPTER_FILES
        return hub.fetch(uri, files, "base_model" if model else uri)[0]
    if not storage.is_remote(uri):
        return Path(uri)
    fs, path = storage.filesystem(uri, storage_options)
    listing = {
        name[len(path) :].lstrip("/"): [info.get("size"), info.get("ETag") or info.get("mtime")]
        for name, info in storage.retrying(
            lambda: fs.find(
                path,
                detail=True,
                **storage.deadline_of(fs, seconds=storage.LISTING_TIMEOUT_SECONDS),
            )
        ).items()
    }
    if not listing:
        raise FileNotFoundError(f"{uri} holds no files")
    key = hashlib.sha256(uri.encode()).hexdigest()[:24]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder, stamp = root / key, root / f"{key}.json"
    signature = json.dumps({"uri": uri, "files": listing}, sort_keys=True, default=str)
    with FileLock(str(root / f"{key}.lock")):
        if folder.is_dir() and stamp.exists() and stamp.read_text() == signature:
            return folder
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            for rel in listing:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                limit = storage.deadline_of(fs, listing[rel][0] or 0)
                storage.retrying(
                    lambda rel=rel, limit=limit: fs.get_file(
                        f"{path}/{rel}", str(tmp / rel), **limit
                    )
                )
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stamp.write_text(signature)
    return folder
