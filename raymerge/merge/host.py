"""A merged adapter's weights on their way to the host, laid out as adapter_model.safetensors.

A merge the fast engine wrote into one buffer laid out as the file's data (`merged.file`) is the
header and that buffer: no copy on the CPU, one copy into pinned host memory from a GPU.
Otherwise, on the CPU the tensors are the file's buffers already (no copy); on a CUDA device
every tensor is copied into one pinned host buffer laid out as the file's data. Copies from a
GPU run on a side stream: they overlap the next merge's arithmetic, and the writer waits for
them (`HostWeights.parts`) in its own thread. Elsewhere (other devices, dtypes not laid out
here) the copy is a plain one.

Usage::

    staged = to_host(merged.tensors, merged.file)   # returns at once on CUDA: copies queued
    parts = staged.parts()             # the file's buffers (waits for the copies)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raymerge.merge.format import weights_layout, weights_parts

if TYPE_CHECKING:
    import torch

    from raymerge.merge.output import FileBuffer

_streams: dict[Any, Any] = {}
_streams_lock = threading.Lock()


@dataclass
class HostWeights:
    """The file's buffers once the copies to the host are done (`ready`: an event, or None)."""

    buffers: list
    ready: Any = None
    nbytes: int = 0

    def parts(self) -> list:
        """The file as buffers, in order (waits for the copies to the host)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.buffers


def to_host(tensors: dict[str, torch.Tensor], file: FileBuffer | None = None) -> HostWeights:
    """Start the copy of `tensors` (views of `file`'s buffer where given) to the host, as the
    safetensors file's buffers."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if file is not None and file.data.device.type in ("cpu", "cuda"):
        return _file_copy(file, nbytes)
    devices = {tensor.device.type for tensor in tensors.values()}
    layout = weights_layout(tensors) if devices == {"cuda"} else None
    if layout is not None:
        return _pinned_copy(tensors, layout, nbytes)
    host = {name: tensor.cpu() for name, tensor in tensors.items()}  # no copy on the CPU
    return HostWeights(weights_parts(host), nbytes=nbytes)


def _file_copy(file: FileBuffer, nbytes: int) -> HostWeights:
    """The header and the one data buffer: as it is on the CPU, one queued copy from a GPU."""
    data = file.data
    if data.device.type == "cpu":
        return HostWeights([file.layout.header, memoryview(data.numpy())], nbytes=nbytes)
    import torch

    host = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=True)
    stream = _side_stream(data.device)
    stream.wait_stream(torch.cuda.current_stream(data.device))
    with torch.cuda.stream(stream):
        host.copy_(data, non_blocking=True)
        data.record_stream(stream)  # not reused by the allocator until copied
    event = torch.cuda.Event()
    event.record(stream)
    return HostWeights([file.layout.header, memoryview(host.numpy())], event, nbytes)


def _pinned_copy(tensors: dict[str, torch.Tensor], layout, nbytes: int) -> HostWeights:
    """Queue each tensor's copy into its slice of one pinned buffer, on a side stream per device
    that first waits for the work that made the tensors; the caching host allocator reuses the
    pinned memory of earlier merges, so this allocates no new page-locked memory in steady state.
    """
    import torch

    data = torch.empty(layout.data_bytes, dtype=torch.uint8, pin_memory=True)
    done = None
    for device in sorted({t.device for t in tensors.values()}, key=str):
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for name, (start, end) in zip(layout.order, layout.offsets, strict=True):
                tensor = tensors[name]
                if tensor.device != device or start == end:
                    continue
                target = data[start:end].view(tensor.dtype).view(tensor.shape)
                target.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # not reused by the allocator until copied
        event = torch.cuda.Event()
        event.record(stream)
        done = _Events(done, event)
    return HostWeights([layout.header, memoryview(data.numpy())], done, nbytes)


@dataclass
class _Events:
    """Every device's copies: synchronised one after the other."""

    earlier: Any
    event: Any

    def synchronize(self) -> None:
        if self.earlier is not None:
            self.earlier.synchronize()
        self.event.synchronize()


def _side_stream(device):
    import torch

    with _streams_lock:
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        return _streams[device]
