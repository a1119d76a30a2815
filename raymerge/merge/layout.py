"""The base model's module layout — module names in PEFT's walking order, layer kinds and weight
shapes — from its config alone, on the meta device (accelerate's `init_empty_weights`): no weight
is read or allocated, so it costs milliseconds even for a 70B model.

The plan checks adapters against it (shapes, Conv1D orientation), and the fast engine follows it
(module order for DARE's random draws, Conv1D layers). Only transformers' own model classes are
built (no remote code).

Example:
    >>> from transformers import LlamaConfig
    >>> layout = layout_from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
    ...     num_hidden_layers=1, num_attention_heads=4, vocab_size=256), "CAUSAL_LM")
    >>> layout.layers["model.layers.0.self_attn.q_proj"]
    Layer(kind='linear', in_features=64, out_features=64)
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
"""PEFT task type -> the transformers class that loads the base model for it."""


@dataclass(frozen=True)
class Layer:
    """A module that LoRA can target: its kind and the features its weight maps between."""

    kind: str
    """linear, conv1d (transformers' Conv1D, weight stored as (in, out)), embedding or conv."""
    in_features: int
    out_features: int

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether PEFT treats the layer's weight as (in, out): Conv1D, whatever the config says."""
        return self.kind == "conv1d"


@dataclass(frozen=True)
class Layout:
    model_class: str
    order: tuple[str, ...]
    """Every module name, in `named_modules()` order (PEFT's walking order)."""
    layers: dict[str, Layer]
    """Targetable modules by name."""
    parameters: int = 0
    """The model's parameter count (what its weights take, times their dtype's size)."""


def model_class_name(config: dict[str, Any], task_type: str | None) -> str:
    """The transformers class a base model is loaded with: the adapters' task type decides (PEFT
    keys are relative to that class), else the checkpoint's own architecture, else AutoModel."""
    import transformers

    if task_type in AUTO_CLASSES:
        return AUTO_CLASSES[task_type]
    for name in config.get("architectures") or []:
        if hasattr(transformers, name):
            return name
    return "AutoModel"


def layout_from_config(config, task_type: str | None = None) -> Layout:
    """The layout of the model a transformers config describes (built on the meta device)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    class_name = model_class_name(config.to_dict(), task_type)
    model_class = getattr(transformers, class_name)
    # On the meta device from the start (init_empty_weights alone still allocates each weight on
    # the host before moving it); transformers' deprecation notices are no news to the user.
    with torch.device("meta"), init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if class_name.startswith("Auto"):
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            layers[name] = Layer("conv1d", int(in_features), int(out_features))
        elif isinstance(module, torch.nn.Linear):
            layers[name] = Layer("linear", module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            layers[name] = Layer("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            layers[name] = Layer("conv", module.in_channels, module.out_channels)
    order = tuple(name for name, _ in model.named_modules())
    return Layout(class_name, order, layers, sum(p.numel() for p in model.parameters()))


def layout_from_config_json(data: bytes, task_type: str | None = None) -> Layout:
    """The layout from a config.json's bytes (a local copy is written for transformers)."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="raymerge-config-") as tmp:
        Path(tmp, "config.json").write_bytes(data)
        config = AutoConfig.from_pretrained(tmp)
    return layout_from_config(config, task_type)


def peft_fan_in_fan_out(flag: bool, modules: list[str], layout: Layout) -> bool:
    """The fan_in_fan_out PEFT ends up with after injecting an adapter into `modules` (in layout
    order): it sets it True at each Conv1D layer and False at each nn.Linear, whatever the config
    said (GPT-2 adapters saved with `fan_in_fan_out: false` merge like any other)."""
    position = {name: i for i, name in enumerate(layout.order)}
    for module in sorted(modules, key=lambda m: position.get(m, len(position))):
        layer = layout.layers.get(module)
        if layer is not None and layer.kind in ("linear", "conv1d"):
            flag = layer.kind == "conv1d"
    return flag
