"""What a storage error means: worth another try (throttling, 5xx, a reset), fatal to every write
to the output (no space, no permission, no bucket), and what to say of it in one line. storage
re-exports these; callers use them from there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from functools import cache

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_FATAL_CODES = {"AccessDenied", "NoSuchBucket", "AllAccessDisabled", "InvalidAccessKeyId"}


@cache
def _transient_classes() -> tuple[type[BaseException], ...]:
    """Network errors worth another try, from the libraries s3fs stands on."""
    import aiohttp
    from botocore import exceptions as botocore_errors

    return (
        ConnectionError,
        TimeoutError,
        botocore_errors.EndpointConnectionError,
        botocore_errors.ConnectTimeoutError,
        botocore_errors.ReadTimeoutError,
        botocore_errors.ConnectionClosedError,
        botocore_errors.ResponseStreamingError,
        botocore_errors.IncompleteReadError,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    )


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """The error and the ones beneath it (s3fs translates botocore's into OSErrors)."""
    for _ in range(8):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def _response(exc: BaseException) -> tuple[str | None, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, 0
    code = response.get("Error", {}).get("Code")
    return code, response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: throttling, 5xx, connection resets, timeouts."""
    for error in _chain(exc):
        if isinstance(error, _transient_classes()):
            return True
        code, status = _response(error)
        if code in _TRANSIENT_CODES or status >= 500:
            return True
    return False


def is_fatal(exc: BaseException) -> bool:
    """Whether a write error will hit every write to this output (no space, no permission, a
    read-only disk, a missing bucket): the sweep should stop rather than fail merge by merge."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in _FATAL_ERRNOS:
            return True
        code, status = _response(error)
        if code in _FATAL_CODES or status == 403:
            return True
    return False


def describe(exc: BaseException) -> str:
    """A storage error in one line, from the most specific error beneath it."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in _FATAL_ERRNOS:
            return f"{os.strerror(error.errno)} ({errno.errorcode[error.errno]})"
        code, _ = _response(error)
        if code:
            return f"{code}: {error}"
    text = str(exc).strip().splitlines()
    said = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if any(type(error).__name__ == "NoCredentialsError" for error in _chain(exc)):
        said += (
            " (S3 credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, ~/.aws, or the instance's or pod's role)"
        )
    return said


@cache
def errors() -> tuple[type[BaseException], ...]:
    """Every error a storage call may raise besides programming errors: for `except`."""
    import aiohttp
    from botocore import exceptions as botocore_errors

    return (
        OSError,
        botocore_errors.BotoCoreError,
        botocore_errors.ClientError,
        aiohttp.ClientError,
    )
