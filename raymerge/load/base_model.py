"""The base model a worker holds: its layout at once (a meta-device skeleton built from the
config, no weights), its weights only when something needs them (evaluation, PEFT's path), loaded
once and sharded over the worker's GPUs with accelerate's `device_map="auto"`.

A merge-only sweep on the fast engine never loads a weight: a worker then needs no GPU and only
the memory of the adapters it merges.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raymerge.errors import InputError
from raymerge.merge.layout import Layout, layout_from_config, model_class_name
from raymerge.store import storage

log = logging.getLogger(__name__)


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
    ):
        from transformers import AutoConfig

        self.location = location
        self.storage_options = storage_options or {}
        self.task_type = task_type
        self.torch_dtype = torch_dtype
        self.gpu_headroom_gb = gpu_headroom_gb
        self._local: str | None = None
        if storage.is_remote(location):
            self.config = _config_from_storage(location, self.storage_options)
        else:
            self.config = AutoConfig.from_pretrained(self.local_location())
        self.layout: Layout = layout_from_config(self.config, task_type)
        self.device = torch.device("cuda", 0) if _has_cuda() else torch.device("cpu")
        """Where merges are computed: this worker's first GPU, else the CPU."""
        self._model = None
        self._peft = None

    def local_location(self) -> str:
        """A local folder (node cache for S3), or a hub id for from_pretrained to resolve."""
        if self._local is None:
            location = self.location
            if "://" in location or Path(location).is_absolute():
                location = str(storage.local_copy(location, self.storage_options))
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
        if _has_cuda():
            # Ray limited CUDA_VISIBLE_DEVICES to this actor's GPUs: shard over those only, and
            # keep headroom on each for adapters and merge buffers.
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = gpu_memory_budget(self.gpu_headroom_gb)
        from safetensors import SafetensorError

        log.info("loading the base model's weights from %s", self.location)
        try:
            model = getattr(transformers, class_name).from_pretrained(
                self.local_location(), **kwargs
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise InputError(
                f"base_model {self.location}: its weights cannot be loaded "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); save it again with "
                "save_pretrained"
            ) from exc
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


def gpu_memory_budget(headroom_gb: float) -> dict[int, int]:
    """Bytes of base-model weights accelerate may put on each visible GPU: all but the headroom."""
    budget = {}
    for device in range(torch.cuda.device_count()):
        _, total = torch.cuda.mem_get_info(device)
        budget[device] = max(0, total - int(headroom_gb * 2**30))
    return budget


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
