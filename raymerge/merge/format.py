"""PEFT's adapter format, known here and nowhere else: file names, key prefixes, LoRA key parsing,
the config's JSON and safetensors (de)serialisation. Bytes and tensors only: no storage.

Example:
    >>> parse_lora_key("base_model.model.layers.0.q_proj.lora_A.weight")
    ('layers.0.q_proj', 'lora_A')
    >>> saved_key("layers.0.q_proj", "lora_B")
    'base_model.model.layers.0.q_proj.lora_B.weight'
    >>> parameter_name(saved_key("q", "lora_A"), "slot_0")
    'base_model.model.q.lora_A.slot_0.weight'
    >>> parse_lora_key("base_model.model.lm_head.weight") is None
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where tensors are (de)serialised
    import torch

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE)
"""The files of a merged adapter, as PEFT's save_pretrained writes them."""
WEIGHT_FILES = (WEIGHTS_FILE, "adapter_model.bin")
"""The weight files an input adapter may have, preferred first (.bin is a pickle)."""
PREFIX = "base_model.model."
"""PEFT's prefix of every saved key of a LoRA adapter on a transformers model."""
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
SAFETENSORS_METADATA = {"format": "pt"}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
"""safetensors' dtype names -> torch's."""


@dataclass(frozen=True)
class AdapterInfo:
    """What is known of one input adapter before its tensors are read: its config and its
    safetensors header (the planner's view)."""

    name: str
    uri: str
    config: dict[str, Any]
    weights_file: str
    tensors: dict[str, list[int]] = field(default_factory=dict)
    """Tensor name -> shape, from the safetensors header (empty for adapter_model.bin)."""
    dtype: str = "float32"
    """The LoRA factors' dtype (torch's name), from the safetensors header."""

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


def _suffix(part: str) -> str:
    # Linear LoRAs save a module's weight (".lora_A.weight"), embedding LoRAs a bare parameter.
    return f".{part}" if part in EMBEDDING_PARTS else f".{part}.weight"


def saved_key(module: str, part: str) -> str:
    """The key under which PEFT saves factor `part` of `module` (relative to the model)."""
    return f"{PREFIX}{module}{_suffix(part)}"


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """(module, part) of a saved LoRA factor's key; None for any other tensor."""
    for part in LORA_PARTS:
        suffix = _suffix(part)
        if key.endswith(suffix):
            return key.removeprefix(PREFIX)[: -len(suffix)], part
    return None


def parameter_name(key: str, adapter_name: str) -> str:
    """The name of saved `key`'s parameter in a PeftModel holding the adapter as `adapter_name`
    (PEFT inserts the adapter's name after the factor's name)."""
    parsed = parse_lora_key(key)
    if parsed is None:
        raise ValueError(f"{key}: not a LoRA factor")
    part = parsed[1]
    suffix = _suffix(part)
    return key[: -len(suffix)] + suffix.replace(part, f"{part}.{adapter_name}")


def config_dict(config) -> dict[str, Any]:
    """A peft.LoraConfig as adapter_config.json holds it (sets as lists, as PEFT writes them)."""
    output = config.to_dict()
    for key, value in output.items():
        if isinstance(value, set):
            output[key] = list(value)
    return output


def config_bytes(config: dict[str, Any]) -> bytes:
    """adapter_config.json's bytes, exactly as PeftConfig.save_pretrained writes them."""
    return json.dumps(config, indent=2, sort_keys=True).encode()


def parse_config(data: bytes) -> dict[str, Any]:
    """adapter_config.json's object (ValueError if it is not JSON)."""
    return json.loads(data)


def weights_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """adapter_model.safetensors' bytes, as PEFT's save_pretrained writes them (device tensors
    are copied to the host)."""
    from safetensors.torch import save

    return save(tensors, metadata=SAFETENSORS_METADATA)


def parse_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors' bytes (on the CPU)."""
    from safetensors.torch import load

    return load(data)


def adapter_files(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, bytes]:
    """File name -> bytes of an adapter, as save_pretrained writes its folder."""
    return {WEIGHTS_FILE: weights_bytes(tensors), CONFIG_FILE: config_bytes(config)}
