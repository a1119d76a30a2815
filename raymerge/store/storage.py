"""The only module that knows fsspec/s3fs: locations, reads, atomic writes, deletes, listings.

A location is a local path, a `file://` URI or an `s3://` URI; an input may also be on the
Hugging Face Hub (`hf://`, read through its cache by `hub`, never here). S3-compatible stores
(MinIO, SeaweedFS) are reached through `storage_options` (`client_kwargs.endpoint_url` or
`endpoint_url`) or the `AWS_ENDPOINT_URL` environment variable; credentials always come from the
standard AWS chain. Every call has connect and read timeouts and bounded retries.

Example:
    >>> resolve("adapters/math", Path("/jobs"))
    '/jobs/adapters/math'
    >>> resolve("s3://bucket/adapters/math/", Path("/jobs"))
    's3://bucket/adapters/math'
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from raymerge.store import hub
from raymerge.store.buffers import BufferStream

# What its errors mean, kept in their own module; callers use them from here.
from raymerge.store.faults import describe as describe
from raymerge.store.faults import errors as errors
from raymerge.store.faults import is_fatal as is_fatal
from raymerge.store.faults import is_transient as is_transient

REMOTE_SCHEMES = ("s3",)
S3_CLIENT_CONFIG = {
    "connect_timeout": 10,
    "read_timeout": 30,
    "retries": {"mode": "standard", "max_attempts": 4},
}
"""botocore's client settings unless `storage_options.config_kwargs` says otherwise: a store that
stops answering fails a call within seconds (never a hang), and throttling and 5xx answers are
retried by botocore's standard mode (exponential backoff with jitter) before raymerge's own."""
CALL_TIMEOUT_SECONDS = 60.0
CALL_BYTES_PER_SECOND = 2 * 2**20
"""Each attempt of a call on S3 ends after CALL_TIMEOUT_SECONDS plus its bytes at
CALL_BYTES_PER_SECOND, whatever stage it is in: botocore's timeouts bound connecting and each
read, but not sending a body to a peer that stopped reading (a partitioned network), where a
request would otherwise wait for ever. The attempt is then cancelled and retried as below."""
LISTING_TIMEOUT_SECONDS = 600.0
"""The deadline of one listing (`find`): a large output is many pages of one call."""
S3FS_RETRIES = 2
"""s3fs's own retries of errors botocore does not retry (a response body cut mid-read)."""
RETRY_ATTEMPTS = 6
RETRY_MAX_SECONDS = 180.0
"""raymerge's retries of a storage call that failed transiently after botocore's and s3fs's:
exponential backoff with full jitter (so that many workers do not retry in lockstep), at most
this many attempts and this long in all: long enough to retry after an attempt that ran into its
deadline (a store that went silent and came back)."""
log = logging.getLogger(__name__)
T = TypeVar("T")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(location: str, base_dir: Path) -> str:
    """An absolute URI for a spec location: remote URIs kept, relative paths under `base_dir`."""
    location = location.strip()
    scheme = _scheme(location)
    if scheme in REMOTE_SCHEMES:
        return location.rstrip("/")
    if scheme == "hf":
        return hub.canonical(location)
    if scheme == "file":
        location = location[len("file://") :]
    elif scheme:
        raise ValueError(
            f"unsupported location {location!r}: use a local path, file://, s3:// or hf://"
        )
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
    if hub.is_hub(uri):
        raise ValueError(f"{uri}: a Hub location is read through the Hub cache, not as storage")
    if not is_remote(uri):
        return fsspec.filesystem("file"), uri
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    has_endpoint = "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {})
    if endpoint and not has_endpoint:
        options["endpoint_url"] = endpoint
    # Other processes write outputs concurrently: a cached listing would be stale.
    options.setdefault("use_listings_cache", False)
    options["config_kwargs"] = {**S3_CLIENT_CONFIG, **options.get("config_kwargs", {})}
    fs = fsspec.filesystem(_scheme(uri), **options)
    fs.retries = S3FS_RETRIES  # a class attribute in s3fs, not a constructor option
    return fs, uri.split("://", 1)[1]


def call_timeout(nbytes: int = 0) -> float:
    """The deadline of one attempt of a call moving `nbytes` (see CALL_BYTES_PER_SECOND)."""
    return CALL_TIMEOUT_SECONDS + nbytes / CALL_BYTES_PER_SECOND


def deadline_of(fs, nbytes: int = 0, seconds: float | None = None) -> dict[str, float]:
    """The keyword that gives an fsspec async filesystem's call a deadline over the whole
    request (fsspec cancels it then): `seconds`, else `call_timeout(nbytes)`. Local filesystems
    take none."""
    if not getattr(fs, "async_impl", False):
        return {}
    return {"timeout": seconds if seconds is not None else call_timeout(nbytes)}


def backoff(min_wait: float = 0.5, max_wait: float = 16.0):
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min_wait * 2**n]
    (capped), so that workers hitting one throttled store spread their retries out."""
    return wait_random_exponential(multiplier=min_wait, max=max_wait)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "raymerge_storage_deadline", default=None
)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Storage calls in this block stop retrying once `seconds` have passed (a caller's bound on
    all its calls together, below each call's own; inside another block, the nearer one)."""
    until = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(until if outer is None else min(outer, until))
    try:
        yield
    finally:
        _deadline.reset(token)


def retrying(
    operation: Callable[[], T],
    *,
    attempts: int = RETRY_ATTEMPTS,
    max_seconds: float = RETRY_MAX_SECONDS,
    min_wait: float = 0.5,
) -> T:
    """Run a storage operation, retrying transient failures with exponential backoff and full
    jitter, at most `attempts` times and `max_seconds` in all (less inside `deadline`); other
    errors at once."""
    until = _deadline.get()
    if until is not None:
        max_seconds = max(0.0, min(max_seconds, until - time.monotonic()))
    retryer = Retrying(
        retry=retry_if_exception(is_transient),
        wait=backoff(min_wait),
        stop=stop_after_attempt(attempts) | stop_before_delay(max_seconds),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    return retryer(operation)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.exists(path, **deadline_of(fs)))


def size(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.size(path, **deadline_of(fs)))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path, **deadline_of(fs)))


def read_range(uri: str, start: int, end: int, storage_options: dict[str, Any] | None = None):
    """Bytes [start, end) of a file, without fetching the rest (a ranged GET on S3)."""
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.cat_file(path, start=start, end=end, **deadline_of(fs, end - start)))


def read_many(uris: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Several small files at once (concurrent on S3); keyed by the given URIs."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0], storage_options)
    paths = {filesystem(u, storage_options)[1]: u for u in uris}
    return {
        paths[p]: data
        for p, data in retrying(lambda: fs.cat(list(paths), **deadline_of(fs))).items()
    }


def find(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """URIs of every file under `uri` (none if it does not exist)."""
    fs, path = filesystem(uri, storage_options)
    prefix = uri[: len(uri) - len(path)]
    try:
        listing = deadline_of(fs, seconds=LISTING_TIMEOUT_SECONDS)
        found = retrying(lambda: fs.find(path, **listing))
    except FileNotFoundError:
        return
    for name in found:
        yield prefix + name


def is_file(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return retrying(lambda: fs.isfile(path, **deadline_of(fs)))


@dataclass(frozen=True)
class Upload:
    """How large files go to S3: as multipart uploads of `part_bytes` parts, `concurrency` of
    them at a time (files under two parts go in one PUT). Local writes ignore it. Either way
    the request bodies are read from the file's buffers in place (`buffers.BufferStream`): the
    upload holds no copy of the file or of a part."""

    part_bytes: int = 16 * 2**20
    concurrency: int = 8


DEFAULT_UPLOAD = Upload()


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part, and
    a failed write leaves nothing behind (no temporary file)."""
    write(uri, data, storage_options)


def write(
    uri: str,
    source: bytes | Path | Sequence,
    storage_options: dict[str, Any] | None = None,
    upload: Upload = DEFAULT_UPLOAD,
    on_block: Callable[[memoryview], None] | None = None,
) -> None:
    """The one atomic write of `source` to `uri`: bytes, a local file's bytes (streamed), or a
    sequence of buffers whose concatenation is the file (written one after the other, never
    joined on a local disk).

    `on_block` (local buffers only) sees each block of the file just before it is written, while
    it is in the cache: a digest computed there costs no pass of its own over memory."""
    if is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        if isinstance(source, Path):  # a multipart upload appears whole when it completes
            nbytes = source.stat().st_size
            retrying(lambda: fs.put_file(str(source), path, **deadline_of(fs, nbytes)))
            return

        # One PUT, or concurrent parts: either way the object appears whole.
        def attempt() -> None:
            # Read from the buffers as it is sent, never joined into one copy of the file; a
            # stream of its own per attempt (a cancelled one may still be read from).
            data = source if isinstance(source, bytes) else BufferStream(source)
            fs.pipe_file(
                path,
                data,
                chunksize=upload.part_bytes,
                max_concurrency=upload.concurrency,
                **deadline_of(fs, len(data)),
            )

        retrying(attempt)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(source, Path):
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
            else:
                for part in [source] if isinstance(source, bytes) else source:
                    if on_block is None:
                        f.write(part)
                        continue
                    view = memoryview(part).cast("B")
                    for start in range(0, len(view), WRITE_BLOCK_BYTES):
                        block = view[start : start + WRITE_BLOCK_BYTES]
                        on_block(block)
                        f.write(block)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


LINES_BLOCK_BYTES = 4 * 2**20
WRITE_BLOCK_BYTES = 1 << 20
"""Blocks a local write hands to `on_block` (a core's cache holds one while it is hashed)."""


def iter_text_lines(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A text file's lines, streamed (never the whole file in memory): read in blocks of
    LINES_BLOCK_BYTES, each a ranged read with its own deadline and retries."""
    total = size(uri, storage_options)
    carry = b""
    for start in range(0, total, LINES_BLOCK_BYTES):
        stop = min(total, start + LINES_BLOCK_BYTES)
        block = carry + read_range(uri, start, stop, storage_options)
        *lines, carry = block.split(b"\n")
        for line in lines:
            yield line.decode() + "\n"
    if carry:
        yield carry.decode()


def check_writable(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """StorageError unless a file can be written (and removed) under `uri`: a probe, so that an
    unwritable output is one clear error before any work rather than a failure per merge."""
    from raymerge.errors import StorageError

    probe = join(uri, f".raymerge-write-check-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write_bytes(probe, b"", storage_options)
        remove([probe], storage_options)
    except errors() as exc:
        raise StorageError(
            f"the output {uri} is not writable: {describe(exc)}; choose another `output` or "
            "fix its permissions or free space"
        ) from exc


def remove(uris: list[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete files (those that exist); best effort, for cleaning up after a failed write."""
    for uri in uris:
        fs, path = filesystem(uri, storage_options)
        try:
            fs.rm_file(path, **deadline_of(fs))
        except (FileNotFoundError, OSError, TimeoutError):
            continue


def delete(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete one file and confirm it is gone (retried as any call); raises the store's error
    if that cannot be confirmed. For a file whose presence means something (a commit marker)."""
    fs, path = filesystem(uri, storage_options)

    def attempt() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path, **deadline_of(fs))
        if fs.exists(path, **deadline_of(fs)):
            raise FileExistsError(f"{uri} is still there after deleting it")

    retrying(attempt)


def file_sizes(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Every file under `uri` (URI -> size in bytes), in one listing; empty if it does not
    exist."""
    fs, path = filesystem(uri, storage_options)
    prefix = uri[: len(uri) - len(path)]
    listing = deadline_of(fs, seconds=LISTING_TIMEOUT_SECONDS)
    try:
        found = retrying(lambda: fs.find(path, detail=True, **listing))
    except FileNotFoundError:
        return {}
    return {prefix + name: int(info.get("size") or 0) for name, info in found.items()}


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower() if "://" in location else ""
