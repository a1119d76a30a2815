"""A Hugging Face Hub cache with repos in it, laid out by huggingface_hub's own cache code from
local files, as a download lays them out: blobs named by content hash, one snapshot per commit of
links to them, the branch's ref, and the commit's tree listing. No Hub is needed to read it:
`HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache>` makes huggingface_hub (and raymerge) read from it.

(There is no public call that adds local files to the cache; these are the helpers its downloads
use, and the tests check the result with its public `scan_cache_dir`.)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    repo_folder_name,
)


def publish(cache: Path, repo_id: str, files: dict[str, Path], branch: str = "main") -> str:
    """A new commit of `repo_id` holding `files` (repo path -> local file), made the head of
    `branch`; returns its hash."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    digests = {path: _sha256(local) for path, local in files.items()}
    commit = hashlib.sha1(repr(sorted(digests.items())).encode()).hexdigest()
    entries = {}
    for path, local in files.items():
        blob = storage / "blobs" / digests[path]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(local, blob)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(link))
        size = local.stat().st_size
        entries[path] = TreeCacheEntry(size, _git_blob_id(local), digests[path], size)
    write_tree_cache(str(storage), commit, entries)
    _cache_commit_hash_for_specific_revision(str(storage), branch, commit)
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Repo path -> local file for every file in `folder`, under `prefix` in the repo."""
    return {
        f"{prefix}{p.relative_to(folder).as_posix()}": p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
