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
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
"""safetensors' dtype names -> torch's, in the order safetensors writes them (it sorts tensors by
dtype, widest first, then by name, which keeps every tensor's offset aligned to its dtype)."""
_LAID_OUT = {
    torch_name: (rank, name) for rank, (name, torch_name) in enumerate(SAFETENSORS_DTYPES.items())
}


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
    source: str = ""
    """The location as the spec gives it, where `uri` pins it further (a Hub input's branch or
    tag, which `uri` names by commit); empty when they are the same."""

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


@dataclass(frozen=True)
class WeightsLayout:
    """adapter_model.safetensors laid out, without its bytes: the header (length prefix and JSON,
    space-padded to 8 bytes), then each tensor's bytes at its offset in the data that follows,
    in `order`. Writing `header` then the tensors' buffers in order gives the bytes
    `weights_bytes` gives (safetensors' own layout), with no joined copy."""

    header: bytes
    order: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    """Each tensor's [start, end) in the data section, in `order`."""

    @property
    def data_bytes(self) -> int:
        return self.offsets[-1][1] if self.offsets else 0

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


def weights_layout(tensors: dict[str, torch.Tensor]) -> WeightsLayout | None:
    """The layout of `tensors`' safetensors file; None where it holds a dtype or a name this
    does not lay out as safetensors would (other dtypes, non-ASCII names): use `weights_bytes`."""
    kinds = {}
    for name, tensor in tensors.items():
        kind = _LAID_OUT.get(str(tensor.dtype).removeprefix("torch."))
        if kind is None or not (name.isascii() and name.isprintable()):
            return None
        kinds[name] = kind
    order = tuple(sorted(tensors, key=lambda name: (kinds[name][0], name)))
    entries: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA}
    offsets, start = [], 0
    for name in order:
        tensor = tensors[name]
        end = start + tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": kinds[name][1],
            "shape": list(tensor.shape),
            "data_offsets": [start, end],
        }
        offsets.append((start, end))
        start = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return WeightsLayout(len(text).to_bytes(8, "little") + text, order, tuple(offsets))


def host_buffers(tensor: torch.Tensor) -> memoryview:
    """A host tensor's bytes as safetensors stores them (little-endian, row-major), without a
    copy where it is contiguous."""
    import torch

    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
        tensor = tensor.view(torch.int16)
    if not tensor.numel():
        return memoryview(b"")
    return memoryview(tensor.numpy()).cast("B")


def weights_parts(tensors: dict[str, torch.Tensor]) -> list:
    """adapter_model.safetensors as a list of buffers whose concatenation is the file (host
    tensors: the header, then each tensor's own memory; see `WeightsLayout`)."""
    layout = weights_layout(tensors)
    if layout is None or any(t.device.type != "cpu" for t in tensors.values()):
        return [weights_bytes(tensors)]
    return [layout.header, *(host_buffers(tensors[name]) for name in layout.order)]


def parse_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors' bytes (on the CPU)."""
    from safetensors.torch import load

    return load(data)


def adapter_files(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, bytes]:
    """File name -> bytes of an adapter, as save_pretrained writes its folder."""
    return {WEIGHTS_FILE: weights_bytes(tensors), CONFIG_FILE: config_bytes(config)}
