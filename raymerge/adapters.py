"""Reading an adapter's config and safetensors header from any location, before any cluster work.

Example:
    >>> info = inspect_adapter("math", "/adapters/math")  # doctest: +SKIP
    >>> info.rank, info.base_model  # doctest: +SKIP
    (8, 'meta-llama/Llama-3.1-8B')
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from raymerge import storage
from raymerge.errors import InputError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class AdapterInfo:
    """What the planner knows of one input adapter."""

    name: str
    uri: str
    config: dict[str, Any]
    weights_file: str
    tensors: dict[str, list[int]] = field(default_factory=dict)
    """Tensor name -> shape, from the safetensors header (empty for adapter_model.bin)."""

    @property
    def rank(self) -> int:
        """The largest rank in the adapter (PEFT sizes merged factors by it)."""
        return max([self.config["r"], *self.config.get("rank_pattern", {}).values()])

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")


def inspect_adapter(
    name: str, uri: str, storage_options: dict[str, Any] | None = None
) -> AdapterInfo:
    """Read and check adapter `name` at `uri`; raises InputError naming the adapter and file."""
    where = f"adapter {name!r} ({uri})"
    try:
        if not storage.exists(uri, storage_options):
            raise InputError(f"{where}: location does not exist; fix `adapters.{name}` in the spec")
        config_uri = storage.join(uri, CONFIG_FILE)
        if not storage.exists(config_uri, storage_options):
            raise InputError(
                f"{where}: {CONFIG_FILE} not found; point `adapters.{name}` at the folder "
                "that PeftModel.save_pretrained wrote"
            )
        config = _parse_config(where, storage.read_bytes(config_uri, storage_options))
        weights = next(
            (w for w in WEIGHT_FILES if storage.exists(storage.join(uri, w), storage_options)),
            None,
        )
        if weights is None:
            raise InputError(f"{where}: no {' or '.join(WEIGHT_FILES)} beside {CONFIG_FILE}")
        tensors = {}
        if weights.endswith(".safetensors"):
            tensors = _safetensors_shapes(where, storage.join(uri, weights), storage_options)
    except InputError:
        raise
    except Exception as exc:  # storage errors: permissions, network, bad endpoint
        raise InputError(f"{where}: cannot be read: {type(exc).__name__}: {exc}") from None
    return AdapterInfo(name=name, uri=uri, config=config, weights_file=weights, tensors=tensors)


def inspect_base_model(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Check that a local or S3 base model folder holds a readable transformers config.json."""
    config_uri = storage.join(uri, "config.json")
    try:
        if not storage.exists(config_uri, storage_options):
            raise InputError(
                f"base_model {uri}: no config.json there; point `base_model` at a folder written "
                "by save_pretrained, or give a hub id"
            )
        config = json.loads(storage.read_bytes(config_uri, storage_options))
    except InputError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"base_model {uri}: config.json is not valid JSON ({exc})") from None
    except Exception as exc:
        raise InputError(f"base_model {uri}: cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(
            f"base_model {uri}: config.json has no model_type; is it a transformers model?"
        )


def _parse_config(where: str, data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"{where}: {CONFIG_FILE} has peft_type {peft_type!r}; raymerge merges LoRA adapters "
            "only (peft_type 'LORA')"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"{where}: {CONFIG_FILE} has r={rank!r}; a LoRA rank is an integer >= 1")
    return config


def _safetensors_shapes(where: str, uri: str, storage_options) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header: 8 bytes of length, then JSON (two ranged reads)."""
    head = storage.read_range(uri, 0, 8, storage_options)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 0 < size <= _MAX_HEADER:
        raise InputError(f"{where}: {uri} is not a safetensors file (bad header length)")
    try:
        header = json.loads(storage.read_range(uri, 8, 8 + size, storage_options))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{where}: {uri} is not a safetensors file (unreadable header)") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
