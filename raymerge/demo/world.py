"""Tiny, fully local model worlds: a Llama-architecture base model and LoRA adapters on it.

Used by the demo, the tests and the benchmark; nothing is downloaded.

Usage (writes a model and adapters, a few seconds)::

    world = build_world(Path("/tmp/w"), {"math": AdapterShape(r=8)})
    world.adapters["math"]   # PosixPath('/tmp/w/adapters/math')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AdapterShape:
    """How to build one random LoRA adapter."""

    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    extra: dict[str, Any] = field(default_factory=dict)
    """Further LoraConfig fields (use_rslora, use_dora, rank_pattern, ...)."""


@dataclass(frozen=True)
class World:
    base_model: Path
    adapters: dict[str, Path]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer(path: Path) -> Path:
    """Save a byte-level tokenizer (256 tokens, one per byte) to `path`: built here, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


def build_base_model(
    path: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
    shape: str | None = None,
) -> Path:
    """Save a randomly initialised Llama-architecture causal LM to `path` (of a named `shape`
    of SHAPES, if given: its layout and vocabulary, with generated weights).

    Drawn in float64 and saved in float32: a float32 draw differs between CPUs (torch's
    vectorised normal sampler depends on the instruction set), its float32 rounding does not.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape is not None:
        config = LlamaConfig(**SHAPES[shape])
    else:
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden_size // 16),
            num_key_value_heads=max(1, hidden_size // 16),
            vocab_size=vocab_size,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float64)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(dtype)
    model.to(torch.float32).save_pretrained(path)
    if config.vocab_size >= 256:
        build_tokenizer(path)  # beside the weights, where evaluation looks for it
    return path


def build_adapter(base_model: Path, path: Path, shape: AdapterShape, *, seed: int) -> Path:
    """Save a LoRA adapter with random, non-zero A and B (as if trained) to `path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=shape.r,
        lora_alpha=shape.lora_alpha,
        target_modules=list(shape.target_modules),
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B too: a zero B would make every merge trivially equal
        **shape.extra,
    )
    torch.manual_seed(seed)
    get_peft_model(base, config).save_pretrained(path)
    return path


def build_world(
    root: Path,
    adapters: dict[str, AdapterShape],
    *,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    shape: str | None = None,
) -> World:
    """A base model under `root/base` (of `shape`, if named) and one adapter per entry under
    `root/adapters/<name>`."""
    base = build_base_model(
        root / "base", hidden_size=hidden_size, layers=layers, seed=seed, shape=shape
    )
    built = {
        name: build_adapter(base, root / "adapters" / name, shape, seed=seed + 1 + i)
        for i, (name, shape) in enumerate(adapters.items())
    }
    return World(base_model=base, adapters=built)


SHAPES = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
"""Model configs of real sizes, for benchmarks and the GPU check: SmolLM2-135M-Instruct's (the
real model's, whose weights are generated where its file cannot go) and Llama-3.1-8B's. Nothing
is downloaded."""
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_config_only_world(
    root: Path,
    shape: str,
    adapters: list[str],
    *,
    rank: int = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> World:
    """A base model of a real size as config.json alone (merge-only sweeps need no weights) and
    LoRA adapters with random factors of its exact shapes, written directly as PEFT saves them."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from raymerge.merge.format import SAFETENSORS_METADATA, WEIGHTS_FILE, saved_key
    from raymerge.merge.layout import layout_from_config

    config = LlamaConfig(**SHAPES[shape])
    base = root / "base"
    config.save_pretrained(base)
    layout = layout_from_config(config, "CAUSAL_LM")
    modules = [
        name
        for name, layer in layout.layers.items()
        if layer.kind == "linear" and name.rsplit(".", 1)[-1] in targets
    ]
    generator = torch.Generator().manual_seed(seed)
    built = {}
    for name in adapters:
        tensors = {}
        for module in modules:
            layer = layout.layers[module]
            a = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
            b = torch.randn(layer.out_features, rank, generator=generator) / rank
            tensors[saved_key(module, "lora_A")] = a.to(getattr(torch, dtype))
            tensors[saved_key(module, "lora_B")] = b.to(getattr(torch, dtype))
        folder = root / "adapters" / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(base),
        ).save_pretrained(folder)
        built[name] = folder
    return World(base_model=base, adapters=built)
