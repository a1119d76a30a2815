"""Where the fast engine writes a merge: one buffer on the merge's device, laid out as the data of
adapter_model.safetensors (each tensor at its offset, in the output dtype).

The merged factors are written into it chunk by chunk as they are computed, each chunk with -0.0
turned into 0.0 and cast to the output dtype in one copy, and each chunk's finiteness noted on
the device. `check` then reads one value back for the whole merge. The file is the header and
this buffer: no further copy on the CPU, one copy to the host from a GPU (`merge.host`).

Example:
    >>> import torch
    >>> out = MergedOutput({"b": (2, 2), "a": (2, 2)}, torch.bfloat16, "cpu")
    >>> out.put(["a"], torch.full((1, 2, 2), -0.0))
    >>> out.put(["b"], torch.ones(1, 2, 2))
    >>> out.check("merge x")
    >>> out.tensors["a"].tolist(), out.tensors["a"].signbit().any().item()
    ([[0.0, 0.0], [0.0, 0.0]], False)
    >>> out.file.layout.order, out.file.data.nbytes
    (('a', 'b'), 16)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raymerge.errors import MergeError
from raymerge.merge import tensors as values
from raymerge.merge.format import WeightsLayout, weights_layout

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FileBuffer:
    """A merged adapter's weights file: its header, and its data as one buffer on the device."""

    layout: WeightsLayout
    data: torch.Tensor
    """uint8, `layout.data_bytes` long, on the merge's device."""


@functools.lru_cache(maxsize=64)
def _layout(shapes: tuple[tuple[str, tuple[int, ...]], ...], dtype) -> WeightsLayout | None:
    """The file's layout for these keys and shapes (a sweep's merges share a few: made once)."""
    import torch

    return weights_layout(
        {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes}
    )


class MergedOutput:
    """The merged tensors (`tensors`: saved key -> view into one buffer), filled by `put`."""

    def __init__(self, shapes: dict[str, Sequence[int]], dtype: torch.dtype, device):
        import torch

        self.dtype = dtype
        shapes = {key: tuple(shape) for key, shape in shapes.items()}
        layout = _layout(tuple(shapes.items()), dtype)
        self._finite: list[torch.Tensor] = []
        self._required: list[tuple[torch.Tensor, str]] = []
        self._starts: dict[str, int] = {}
        if layout is None:  # names or a dtype safetensors would lay out otherwise: one per key
            self.file = None
            self.tensors = {
                key: torch.empty(shape, dtype=dtype, device=device) for key, shape in shapes.items()
            }
            return
        data = torch.empty(layout.data_bytes, dtype=torch.uint8, device=device)
        self.file = FileBuffer(layout, data)
        self._typed = data.view(dtype)
        size = self._typed.element_size()
        self.tensors = {}
        for key, (start, end) in zip(layout.order, layout.offsets, strict=True):
            self._starts[key] = start // size
            self.tensors[key] = self._typed[start // size : end // size].view(shapes[key])

    def put(self, keys: Sequence[str], merged: torch.Tensor) -> None:
        """Write `merged` ([len(keys), *shape], any float dtype) as the tensors `keys`."""
        import torch

        merged = merged + 0.0  # -0.0 becomes 0.0: equal values, equal bytes whichever path
        region = self._region(keys)
        if region is not None:
            targets = [(region, merged)]
        else:
            targets = [(self.tensors[k], m) for k, m in zip(keys, merged, strict=True)]
        for target, value in targets:
            if target.shape != value.shape:
                raise ValueError(f"{keys[0]}: merged shape {tuple(value.shape)}, file has "
                                 f"{tuple(target.shape)}")  # fmt: skip
            target.copy_(value)
            # A finite sum means every value is finite (NaN and Inf propagate through it): one
            # cheap pass while the chunk is in the cache. A sum that overflows is rare, and only
            # sends `check` through the tensors one by one.
            # float16's own sum overflows at 65504: its sum is taken in float32.
            wide = torch.float32 if target.dtype == torch.float16 else None
            self._finite.append(torch.isfinite(target.sum(dtype=wide)))

    def require(self, flag: torch.Tensor, message: str) -> None:
        """A condition of the merge's inputs (a 0-dim bool on the device), read with the output's
        own at `check`; `message` is the MergeError if it is false."""
        self._required.append((flag, message))

    def position(self, key: str) -> int:
        """Where `key`'s tensor starts in the file's data, in elements (0 when not laid out):
        sorting by it gives file order."""
        return self._starts.get(key, 0)

    def check(self, what: str) -> None:
        """MergeError for the first requirement that failed, else naming the first tensor holding
        NaN or Inf (in the output dtype): one value read for the whole merge; flag by flag, then
        tensor by tensor, only once it has failed."""
        import torch

        flags = [flag for flag, _ in self._required] + self._finite
        if not flags or values.all_true(torch.stack(flags)):
            return
        for flag, message in self._required:
            if not values.all_true(flag):
                raise MergeError(message)
        dtype = values.dtype_name(self.dtype)
        values.check_finite(self.tensors, what if dtype == "float32" else f"{what} in {dtype}")

    def _region(self, keys: Sequence[str]):
        """`keys`' tensors as one strided view [len(keys), *shape] where they lie evenly spaced
        in the buffer (a group's modules in file order do), else None."""
        if self.file is None:
            return None
        first = self.tensors[keys[0]]
        starts = [self._starts[k] for k in keys]
        step = starts[1] - starts[0] if len(starts) > 1 else first.numel()
        if step < first.numel() or any(
            self.tensors[k].shape != first.shape or s != starts[0] + i * step
            for i, (k, s) in enumerate(zip(keys, starts, strict=True))
        ):
            return None
        return self._typed.as_strided(
            (len(keys), *first.shape),
            (step, *first.stride()),  # each tensor is a contiguous view of the buffer
            self._typed.storage_offset() + starts[0],
        )
