"""The base model a worker holds: its layout at once (a meta-device skeleton built from the
config, no weights), its weights only when something needs them (evaluation, PEFT's path), loaded
once and sharded over the worker's GPUs with accelerate's `device_map="auto"`.

A merge-only sweep on the fast engine never loads a weight: a worker then needs no GPU and only
the memory of the adapters it merges.

A worker computes on CUDA only when it holds GPUs (`gpus` > 0) and CUDA is there. Its weights
go where `gpu_memory_budget` allows: each GPU's free memory (at most the worker's share of the
card) less the headroom, then host memory, never disk; a load that runs out of memory is a
`ClusterError` that says what to change, not a broken checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raymerge.errors import ClusterError, InputError, RaymergeError, is_out_of_memory
from raymerge.merge.layout import Layout, layout_from_config, model_class_name
from raymerge.store import hub, input_cache, storage

log = logging.getLogger(__name__)

GB = 2**30
HOST_MARGIN_BYTES = 2 * GB
"""Host memory never offered to accelerate for weights: a tenth of what is available, and at
least this (the worker's adapters and merges live there too)."""
OOM_HINT = (
    "give it more memory: raise `gpus_per_worker` (its weights are sharded over the worker's "
    "GPUs), lower `gpu_headroom_gb`, or load it in a smaller `torch_dtype` (bfloat16 takes half "
    "of float32)"
)
HOST_OOM_HINT = (
    "give the worker more host memory (a larger node, or fewer workers on each node), give it "
    "GPUs (`gpus_per_worker`), or load it in a smaller `torch_dtype` (bfloat16 takes half of "
    "float32)"
)


class BaseModel:
    """One base model: layout now, weights and the PeftModel around them on first use."""

    def __init__(
        self,
        location: str,
        storage_options: dict[str, Any] | None = None,
        *,
        task_type: str | None = None,
        torch_dtype: str = "auto",
        gpu_headroom_gb: float = 2.0,
        gpus: float = 0,
    ):
        from transformers import AutoConfig

        self.location = location
        self.storage_options = storage_options or {}
        self.task_type = task_type
        self.torch_dtype = torch_dtype
        self.gpu_headroom_gb = gpu_headroom_gb
        self.gpus = gpus
        self._local: str | None = None
        if hub.is_hub(location):  # its config alone: a merge-only sweep needs no weights
            folder = hub.fetch(location, ("config.json",), f"base_model {location}")[0]
            self.config = AutoConfig.from_pretrained(folder)
        elif storage.is_remote(location):
            self.config = _config_from_storage(location, self.storage_options)
        else:
            self.config = AutoConfig.from_pretrained(self.local_location())
        self.layout: Layout = layout_from_config(self.config, task_type)
        self.device = compute_device(gpus, _has_cuda())
        """Where merges are computed: this worker's first GPU when it holds any, else the CPU."""
        self._model = None
        self._peft = None

    def local_location(self) -> str:
        """A local folder (node cache for S3), or a hub id for from_pretrained to resolve."""
        if self._local is None:
            location = self.location
            if "://" in location or Path(location).is_absolute():
                location = str(input_cache.local_copy(location, self.storage_options, model=True))
            self._local = location
        return self._local

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self):
        """The base model with its weights, loaded once (sharded over this worker's GPUs)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        import transformers

        class_name = model_class_name(self.config.to_dict(), self.task_type)
        dtype = self.torch_dtype
        kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        budget = None
        if self.device.type == "cuda":
            # Ray limited CUDA_VISIBLE_DEVICES to this actor's GPUs: shard over those only, keep
            # headroom on each for adapters and merge buffers, and spill to host memory at most.
            budget = gpu_memory_budget(
                _cuda_figures(self.gpus), self.gpu_headroom_gb, self.gpus, _host_available()
            )
            needed = weight_bytes(self.layout.parameters, self.config, dtype)
            check_fits(self.location, needed, budget)
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = budget
        from safetensors import SafetensorError

        log.info("loading the base model's weights from %s", self.location)
        try:
            model = getattr(transformers, class_name).from_pretrained(
                self.local_location(), **kwargs
            )
        except (OSError, ValueError, RuntimeError, MemoryError, SafetensorError) as exc:
            raise load_error(self.location, exc, budget) from exc
        check_placement(self.location, model, budget)
        model.eval()
        return model

    @property
    def peft(self):
        """The PeftModel around the base model (None until an adapter is loaded into it)."""
        return self._peft

    def load_adapter(self, path: Path | str, adapter_name: str):
        """Load an adapter folder into the PeftModel, wrapping the base model on first use."""
        from peft import PeftModel

        if self._peft is None:
            with _deprecations_logged():
                self._peft = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=adapter_name
                )
        else:
            self._peft.load_adapter(str(path), adapter_name=adapter_name)
        return self._peft

    def add_adapter(self, adapter_name: str, config):
        """Inject an adapter (zero-initialised modules) into the PeftModel, wrapping the base
        model on first use."""
        from peft import get_peft_model

        if self._peft is None:
            with _deprecations_logged():
                self._peft = get_peft_model(self.model, config, adapter_name=adapter_name)
            self._peft.eval()
        else:
            self._peft.add_adapter(adapter_name, config)
        return self._peft

    def load_weights(self, adapter_name: str, state: dict) -> None:
        """Copy an adapter's saved tensors into its injected modules (as PEFT's load does)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self._peft, state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {adapter_name}: its files do not fit the model (unexpected "
                f"{result.unexpected_keys[:3]}, missing {missing[:3]})"
            )

    def devices(self) -> list[str]:
        """Devices holding the weights (none before they are loaded)."""
        if self._model is None:
            return []
        return sorted({str(p.device) for p in self._model.parameters()})


def _config_from_storage(location: str, storage_options: dict[str, Any]):
    """A remote base model's config: only config.json is fetched (the weights wait)."""
    import tempfile

    from transformers import AutoConfig

    data = storage.read_bytes(storage.join(location, "config.json"), storage_options)
    with tempfile.TemporaryDirectory(prefix="raymerge-config-") as tmp:
        Path(tmp, "config.json").write_bytes(data)
        return AutoConfig.from_pretrained(tmp)


def _has_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def compute_device(gpus: float, cuda_available: bool) -> torch.device:
    """Where a worker holding `gpus` GPUs computes: its first GPU when it holds any and CUDA is
    there, else the CPU (a zero-GPU worker on a GPU node too).

    >>> compute_device(0, cuda_available=True), compute_device(0.5, cuda_available=True)
    (device(type='cpu'), device(type='cuda', index=0))
    """
    return torch.device("cuda", 0) if gpus > 0 and cuda_available else torch.device("cpu")


def gpu_memory_budget(
    devices: list[tuple[int, int]], headroom_gb: float, gpus: float, host_available: int
) -> dict[int | str, int]:
    """`max_memory` for from_pretrained: bytes of weights accelerate may put on each of the
    worker's GPUs and on the host, never on disk.

    `devices` holds each GPU's (free, total) bytes (torch.cuda.mem_get_info). A GPU gets its free
    memory, capped at this worker's share of the card (a fraction of it when `gpus` < 1: other
    workers hold the rest), less `headroom_gb`; `cpu` gets the host's available memory less a
    margin (a tenth, at least 2 GiB).

    >>> gpu_memory_budget([(80 * GB, 80 * GB)], 2, 0.5, 10 * GB) == {0: 38 * GB, "cpu": 8 * GB}
    True
    """
    share = gpus if 0 < gpus < 1 else 1.0
    headroom = int(headroom_gb * GB)
    budget: dict[int | str, int] = {
        index: max(0, min(free, int(total * share)) - headroom)
        for index, (free, total) in enumerate(devices)
    }
    budget["cpu"] = max(0, host_available - max(HOST_MARGIN_BYTES, host_available // 10))
    return budget


def check_fits(location: str, needed: int, budget: dict[int | str, int]) -> None:
    """Refuse a load whose weights (`needed` bytes) exceed the budget of GPUs and host together:
    accelerate would put the rest on disk, which from_pretrained cannot load."""
    if needed > sum(budget.values()):
        raise ClusterError(
            f"base_model {location}: its weights take {needed / GB:.1f} GB, more than this worker "
            f"may use ({describe_budget(budget)}); {OOM_HINT}"
        )


def describe_budget(budget: dict[int | str, int]) -> str:
    """`GPU 0: 38.0 GB, cpu: 8.0 GB`."""
    return ", ".join(
        f"{'GPU ' if isinstance(device, int) else ''}{device}: {size / GB:.1f} GB"
        for device, size in budget.items()
    )


def weight_bytes(parameters: int, config, torch_dtype: str) -> int:
    """Bytes of `parameters` weights (the layout's count) in `torch_dtype`. auto: the dtype the
    config names, else 2 bytes a parameter, the least a float checkpoint takes (so that
    `check_fits` refuses only what cannot fit)."""
    dtype = torch_dtype if torch_dtype != "auto" else getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.bfloat16
    return parameters * dtype.itemsize


def load_error(
    location: str, exc: BaseException, budget: dict[int | str, int] | None = None
) -> RaymergeError:
    """The error a failed weight load is reported as: out of memory (a resource of the worker,
    with what to change), else an unusable checkpoint (an input to fix)."""
    lines = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()
    if is_out_of_memory(exc):
        used = f"; this worker may use {describe_budget(budget)}" if budget else ""
        hint = OOM_HINT if budget else HOST_OOM_HINT  # a budget is made for GPU workers only
        return ClusterError(
            f"base_model {location}: out of memory while loading its weights ({what}){used}; {hint}"
        )
    return InputError(
        f"base_model {location}: its weights cannot be loaded ({what}); save it again with "
        "save_pretrained"
    )


def check_placement(location: str, model, budget: dict[int | str, int] | None) -> None:
    """No weight on disk (accelerate's last resort); weights on the host are slow: said."""
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    if "disk" in placed:
        raise ClusterError(
            f"base_model {location}: its weights do not fit this worker's GPUs and host memory "
            f"({describe_budget(budget or {})}) and would be offloaded to disk; {OOM_HINT}"
        )
    if "cpu" in placed:
        log.warning(
            "base_model %s: part of its weights is on the host, not the GPUs (slower); %s",
            location,
            OOM_HINT,
        )


def _cuda_figures(gpus: float) -> list[tuple[int, int]]:
    """(free, total) bytes of each GPU this worker holds (Ray shows it only those; in-process,
    the first ceil(gpus) of the visible ones)."""
    count = min(torch.cuda.device_count(), max(1, math.ceil(gpus)))
    return [tuple(torch.cuda.mem_get_info(index)) for index in range(count)]


def _host_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


@contextlib.contextmanager
def _deprecations_logged() -> Iterator[None]:
    """Wrapping the base model in a PeftModel: PEFT touches transformers attributes deprecated
    in its newer versions. That is news for neither the user nor a merge: logged, not printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, FutureWarning | DeprecationWarning):
            log.debug("while wrapping the base model: %s", warning.message)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
