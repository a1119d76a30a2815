"""Reading an adapter's config and safetensors header from any location, before any cluster work.

Usage (reads the adapter's folder, local or on S3)::

    info = inspect_adapter("math", "s3://bucket/adapters/math")
    info.rank, info.base_model   # (8, 'meta-llama/Llama-3.1-8B')
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymerge.errors import InputError, MergeError
from raymerge.merge.format import (
    CONFIG_FILE,
    EMBEDDING_PARTS,
    SAFETENSORS_DTYPES,
    WEIGHT_FILES,
    AdapterInfo,
    parse_lora_key,
)
from raymerge.store import hub, input_cache, storage
from raymerge.store.inputs import file_sha256

if TYPE_CHECKING:
    from raymerge.merge.layout import Layout
    from raymerge.merge.tensors import AdapterTensors

__all__ = ["AdapterInfo", "inspect_adapter", "inspect_base_model", "load_adapter_tensors"]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def inspect_adapter(
    name: str,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    allow_pickle: bool = False,
) -> AdapterInfo:
    """Read and check adapter `name` at `uri`; raises InputError naming the adapter and file.

    A Hub location is fetched into the Hub cache and pinned: the result's `uri` names the commit
    its revision points at now, its `source` the location as given."""
    where = f"adapter {name!r} ({uri})"
    if hub.is_hub(uri):
        folder, commit = hub.fetch(uri, hub.ADAPTER_FILES, where)
        if (folder / CONFIG_FILE).exists() and not (folder / WEIGHT_FILES[0]).exists():
            raise InputError(
                f"{where}: has no {WEIGHT_FILES[0]} at commit {commit[:12]}; raymerge reads "
                "adapters from the Hub as safetensors only (a pickle can run code when loaded)"
            )
        info = _inspect(name, where, str(folder), None, allow_pickle)
        return replace(info, uri=hub.pinned(uri, commit), source=uri)
    return _inspect(name, where, uri, storage_options, allow_pickle)


def _inspect(
    name: str, where: str, uri: str, storage_options: dict[str, Any] | None, allow_pickle: bool
) -> AdapterInfo:
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
        if weights.endswith(".bin") and not allow_pickle:
            raise InputError(
                f"{where}: has only adapter_model.bin, a pickle that can run code when loaded; "
                "re-save it with save_pretrained(safe_serialization=True), or set "
                "`allow_pickle: true` in the spec if you trust it (loaded with weights_only=True)"
            )
        tensors, dtype = {}, "float32"
        if weights.endswith(".safetensors"):
            header = read_safetensors_header(where, storage.join(uri, weights), storage_options)
            tensors = {k: v["shape"] for k, v in header.items()}
            dtypes = {v["dtype"] for k, v in header.items() if "lora_" in k}
            dtype = SAFETENSORS_DTYPES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else dtype
    except storage.errors() as exc:  # permissions, network, a bad endpoint
        raise InputError(f"{where}: cannot be read: {storage.describe(exc)}") from exc
    return AdapterInfo(name, uri, config, weights, tensors, dtype)


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"base_model {uri}: config.json is not valid JSON ({exc})") from exc
    except storage.errors() as exc:
        raise InputError(f"base_model {uri}: cannot be read: {storage.describe(exc)}") from exc
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


def read_safetensors_header(
    where: str, uri: str, storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor table (two ranged reads), checked against the file's size.

    A header that promises more bytes than the file holds means a truncated upload or copy.
    """
    head = storage.read_range(uri, 0, 8, storage_options)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 0 < size <= _MAX_HEADER:
        raise InputError(f"{where}: {uri} is not a safetensors file (bad header length)")
    try:
        header = json.loads(storage.read_range(uri, 8, 8 + size, storage_options))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise InputError(f"{where}: {uri} is not a safetensors file (unreadable header)") from None
    actual = storage.size(uri, storage_options)
    if actual < 8 + size + end:
        raise InputError(
            f"{where}: {uri} is truncated: its header describes {8 + size + end} bytes but the "
            f"file has {actual}; copy or upload it again"
        )
    return header


def read_base_shapes(uri: str, storage_options: dict[str, Any] | None = None):
    """Weight name -> shape of a base model, from its safetensors headers (no weights loaded).

    None when the base model has no safetensors files to read (a hub id, or .bin weights).
    """
    where = f"base_model {uri}"
    index_uri = storage.join(uri, "model.safetensors.index.json")
    try:
        if storage.exists(index_uri, storage_options):
            shards = sorted(
                set(
                    json.loads(storage.read_bytes(index_uri, storage_options))[
                        "weight_map"
                    ].values()
                )
            )
        elif storage.exists(storage.join(uri, "model.safetensors"), storage_options):
            shards = ["model.safetensors"]
        else:
            return None
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise InputError(f"{where}: model.safetensors.index.json is unreadable ({exc})") from None
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        header = read_safetensors_header(where, storage.join(uri, shard), storage_options)
        shapes.update({k: v["shape"] for k, v in header.items()})
    return shapes


def load_adapter_tensors(
    name: str, uri: str, storage_options: dict[str, Any] | None, layout: Layout, device
) -> AdapterTensors:
    """Adapter `name`'s config and factors (float32 on `device`) with its provenance, checked:
    a file that cannot be read or a tensor holding NaN/Inf is a MergeError naming both."""
    from raymerge.merge.layout import peft_fan_in_fan_out
    from raymerge.merge.tensors import AdapterTensors

    where = f"adapter {name!r} ({uri})"
    try:
        folder = input_cache.local_copy(uri, storage_options)
    except InputError as exc:  # a Hub input: its message says where and why
        raise MergeError(f"adapter {name!r}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise MergeError(f"{where}: cannot be fetched: {type(exc).__name__}: {exc}") from exc
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).exists()), None)
    if weights is None:
        raise MergeError(f"{where}: {' or '.join(WEIGHT_FILES)} has disappeared; restore it")
    state, config = _read_files(where, folder, weights)
    factors, embedding = _factors(where, weights.name, state, device)
    config.inference_mode = True  # as PeftModel.from_pretrained loads it
    config.fan_in_fan_out = peft_fan_in_fan_out(config.fan_in_fan_out, list(factors), layout)
    provenance = {
        "name": name,
        "uri": uri,
        "weights_file": weights.name,
        "weights_sha256": file_sha256(weights),
        "config_sha256": file_sha256(folder / CONFIG_FILE),
    }
    return AdapterTensors(name, config, factors, folder, frozenset(embedding), provenance)


def _read_files(where: str, folder: Path, weights: Path):
    """The weights' tensors and the LoraConfig, or a MergeError saying which file is unreadable."""
    import pickle

    import torch
    from peft import LoraConfig
    from safetensors import SafetensorError

    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:  # admitted by the plan only with allow_pickle: true
            state = torch.load(weights, map_location="cpu", weights_only=True)
        return state, LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
        raise MergeError(
            f"{where}: {weights.name} or {CONFIG_FILE} cannot be read ({type(exc).__name__}: "
            f"{exc}); was it truncated or replaced while the sweep ran? Check it and run again"
        ) from exc


def _factors(where: str, weights_name: str, state: dict, device):
    """Module -> (A, B) in float32 on `device`, and the modules that are embedding LoRAs."""
    import torch

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeError(
                f"{where}: {key} in {weights_name} holds {bad} non-finite value(s) "
                "(NaN or Inf); every merge with this adapter fails: fix or retrain it"
            )
        module, part = parsed
        parts.setdefault(module, {})[part] = tensor.to(device=device, dtype=torch.float32)
    factors, embedding = {}, set()
    for module, found in parts.items():
        if "lora_A" in found:
            factors[module] = (found["lora_A"], found["lora_B"])
        else:
            factors[module] = tuple(found[part] for part in EMBEDDING_PARTS)
            embedding.add(module)
    return factors, embedding
