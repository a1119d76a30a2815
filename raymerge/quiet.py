"""Library chatter kept out of raymerge's output, in the CLI and in every worker.

transformers' and the Hub's progress bars ("Loading weights", "Writing model shards") are off,
their advisory logs at error, Ray's notice that token authentication is on is not repeated on
every start, and warnings raised inside the libraries (FutureWarning, PEFT's UserWarnings) are
counted rather than interleaved with raymerge's lines: `hidden_warnings()` says how many, and
RAYMERGE_SHOW_WARNINGS=1 shows them all as Python would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator

SHOW_WARNINGS = "RAYMERGE_SHOW_WARNINGS"

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""Set (unless the user set them) before the libraries are imported; local Ray workers inherit
them from the driver's environment."""

QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)

_hidden: Counter[str] = Counter()
_show = warnings.showwarning
_own_code = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for library code: counted, not printed; raymerge's own print."""
    if os.path.abspath(filename).startswith(_own_code):
        _show(message, category, filename, lineno, file, line)
        return
    text = str(message).strip()
    _hidden[f"{category.__name__}: {text.splitlines()[0] if text else ''}"] += 1


def quiet_libraries() -> None:
    """Turn the chatter down in this process (idempotent; cheap to call on every start)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # imported before us: tell it directly as well
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get(SHOW_WARNINGS, "") not in ("", "0") or sys.warnoptions:
        return  # the user asked for them (RAYMERGE_SHOW_WARNINGS=1 or python -W)
    warnings.showwarning = _library_warning


def hidden_warnings() -> str | None:
    """One line about the library warnings this process hid, or None if it hid none."""
    if not _hidden:
        return None
    total = sum(_hidden.values())
    first, _ = _hidden.most_common(1)[0]
    example = first if len(first) <= 70 else first[:69] + "…"
    count = f"{total} warning{'s' if total > 1 else ''}"
    kinds = f"{len(_hidden)} kinds, e.g. " if len(_hidden) > 1 else ""
    return f"{count} from libraries hidden ({kinds}{example}); {SHOW_WARNINGS}=1 shows them"


_recording = threading.local()  # .caught: the list the current thread's warnings go to
_recorders = 0  # threads recording now (under _recording_lock)
_recording_lock = threading.Lock()
_outer_show = warnings.showwarning  # where a thread that does not record sends its warnings
_ALWAYS = ("always", None, Warning, None, 0)  # the filter entry simplefilter("always") adds


def _show_or_record(message, category, filename, lineno, file=None, line=None) -> None:
    caught = getattr(_recording, "caught", None)
    if caught is None:  # a thread that is not recording: as before
        _outer_show(message, category, filename, lineno, file, line)
        return
    caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list]:
    """The warnings raised by this thread in the block, every one (PEFT reports merge caveats
    as UserWarnings), collected for the caller's record instead of shown. Other threads'
    warnings are not collected here (`warnings.catch_warnings` is process-wide: it would record
    a writer thread's warnings with the merge at hand), and behave as before.

    The hook that routes them stays installed once set (a `catch_warnings` block in another
    thread may save and restore it at any time: it must never be restored over itself); the
    "always" filter is there while any thread records."""
    global _recorders, _outer_show
    caught: list = []
    previous = getattr(_recording, "caught", None)
    _recording.caught = caught
    with _recording_lock:
        if warnings.showwarning is not _show_or_record:  # first use, or replaced since
            _outer_show = warnings.showwarning
            warnings.showwarning = _show_or_record
        if _recorders == 0 and _ALWAYS not in warnings.filters:
            warnings.simplefilter("always")  # every occurrence, not once per place
        _recorders += 1
    try:
        yield caught
    finally:
        _recording.caught = previous
        with _recording_lock:
            _recorders -= 1
            if _recorders == 0:
                with contextlib.suppress(ValueError):
                    warnings.filters.remove(_ALWAYS)
