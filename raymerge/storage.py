"""The only module that knows fsspec/s3fs: locations, reads, atomic writes, the input cache.

A location is a local path, a `file://` URI or an `s3://` URI. S3-compatible stores (MinIO, moto)
are reached through `storage_options` (`client_kwargs.endpoint_url` or `endpoint_url`) or the
`AWS_ENDPOINT_URL` environment variable; credentials always come from the standard AWS chain.

Example:
    >>> resolve("adapters/math", Path("/jobs"))
    '/jobs/adapters/math'
    >>> resolve("s3://bucket/adapters/math/", Path("/jobs"))
    's3://bucket/adapters/math'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from filelock import FileLock

REMOTE_SCHEMES = ("s3",)
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Seconds between attempts of a storage operation that failed transiently (after s3fs and
botocore's own quick retries gave up): throttling, 5xx, connection resets, timeouts."""
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ResponseStreamingError",
    "IncompleteRead",
}
log = logging.getLogger(__name__)
T = TypeVar("T")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(location: str, base_dir: Path) -> str:
    """An absolute URI for a spec location: remote URIs kept, relative paths under `base_dir`."""
    location = location.strip()
    scheme = _scheme(location)
    if scheme in REMOTE_SCHEMES:
        return location.rstrip("/")
    if scheme == "file":
        location = location[len("file://") :]
    elif scheme:
        raise ValueError(f"unsupported location {location!r}: use a local path, file:// or s3://")
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def is_remote(uri: str) -> bool:
    """Whether `uri` lives on object storage rather than this node's disk."""
    return _scheme(uri) in REMOTE_SCHEMES


def looks_like_hub_id(location: str, base_dir: Path) -> bool:
    """`org/name` with no such local folder: a hub id, which only `from_pretrained` resolves."""
    if _scheme(location) or location.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(location)) and not (base_dir / location).exists()


def join(uri: str, *parts: str) -> str:
    """`uri/part/part`, for local paths and URIs alike."""
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """The fsspec filesystem for `uri` and the path within it."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), uri
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    has_endpoint = "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {})
    if endpoint and not has_endpoint:
        options["endpoint_url"] = endpoint
    # Other processes write outputs concurrently: a cached listing would be stale.
    options.setdefault("use_listings_cache", False)
    fs = fsspec.filesystem(_scheme(uri), **options)
    return fs, uri.split("://", 1)[1]


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: looks through s3fs's translated exceptions to
    the botocore or aiohttp error beneath."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or status >= 500:
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retrying(operation: Callable[[], T], *, delays: tuple[float, ...] = RETRY_DELAYS) -> T:
    """Run a storage operation, retrying transient failures with exponential backoff."""
    for delay in (*delays, None):
        try:
            return operation()
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            log.warning(
                "transient storage error, retrying in %.1f s: %s", delay, type(exc).__name__
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.exists(path))


def size(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.size(path))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path))


def read_range(uri: str, start: int, end: int, storage_options: dict[str, Any] | None = None):
    """Bytes [start, end) of a file, without fetching the rest (a ranged GET on S3)."""
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path, start=start, end=end))


def read_many(uris: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Several small files at once (concurrent on S3); keyed by the given URIs."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0], storage_options)
    paths = {filesystem(u, storage_options)[1]: u for u in uris}
    return {paths[p]: data for p, data in retrying(lambda: fs.cat(list(paths))).items()}


def find(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """URIs of every file under `uri` (none if it does not exist)."""
    fs, path = filesystem(uri, storage_options)
    prefix = uri[: len(uri) - len(path)]
    try:
        found = retrying(lambda: fs.find(path))
    except FileNotFoundError:
        return
    for name in found:
        yield prefix + name


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part."""
    if is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        retrying(lambda: fs.pipe_file(path, data))  # one PUT: S3 objects appear whole
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_file(local: Path, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a local file to `uri` atomically."""
    if is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        retrying(lambda: fs.put_file(str(local), path))
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(local, tmp)
    os.replace(tmp, target)


def cache_dir() -> Path:
    """Node-local cache of remote inputs (`RAYMERGE_CACHE`, default ~/.cache/raymerge)."""
    return Path(os.environ.get("RAYMERGE_CACHE", Path.home() / ".cache" / "raymerge"))


def local_copy(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder holding `uri`'s files: the folder itself if local, else a node-local cache.

    Remote folders are downloaded once per node: workers on one node share the copy (a file lock
    serialises them), and it is fetched again only if the remote files changed (size or ETag).
    """
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem(uri, storage_options)
    listing = {
        name[len(path) :].lstrip("/"): [info.get("size"), info.get("ETag") or info.get("mtime")]
        for name, info in retrying(lambda: fs.find(path, detail=True)).items()
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
                retrying(lambda rel=rel: fs.get_file(f"{path}/{rel}", str(tmp / rel)))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stamp.write_text(signature)
    return folder


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower() if "://" in location else ""
