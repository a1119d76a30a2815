"""Buffers read as one file without joining them: what an upload to S3 sends a merge's weights
from (a header, then each tensor's own bytes).

A `BufferStream` is a seekable binary stream over the concatenation: a request body is read from
it in small chunks, and a slice of it is a stream over that range (s3fs's multipart upload takes
`len` of its data and a slice per part). No copy of the file, or of a part, is ever made.

Example:
    >>> stream = BufferStream([b"head", bytearray(b"er-"), memoryview(b"body")])
    >>> len(stream), stream.read()
    (11, b'header-body')
    >>> part = stream[2:8]
    >>> len(part), part.read(3), part.read()
    (6, b'ade', b'r-b')
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
from collections.abc import Sequence


class BufferStream(io.RawIOBase):
    """The bytes [start, stop) of the buffers' concatenation, as a seekable stream."""

    def __init__(self, buffers: Sequence, *, _shared=None, start: int = 0, stop: int | None = None):
        if _shared is None:
            views = [memoryview(buffer).cast("B") for buffer in buffers]
            starts = list(itertools.accumulate((view.nbytes for view in views), initial=0))
            _shared = (views, starts)
        self._views, self._starts = _shared
        self._start = start
        self._stop = self._starts[-1] if stop is None else stop
        self._position = start

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, span: slice) -> BufferStream:
        start, stop, _ = span.indices(len(self))
        shared = (self._views, self._starts)
        return BufferStream((), _shared=shared, start=self._start + start, stop=self._start + stop)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.tell(), os.SEEK_END: len(self)}[whence]
        self._position = self._start + min(max(0, base + offset), len(self))
        return self.tell()

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        wanted = min(out.nbytes, self._stop - self._position)
        done = 0
        index = bisect.bisect_right(self._starts, self._position) - 1
        while done < wanted:
            view, offset = self._views[index], self._position - self._starts[index]
            count = min(view.nbytes - offset, wanted - done)
            out[done : done + count] = view[offset : offset + count]
            done += count
            self._position += count
            index += 1
        return done
