"""Which adapters raymerge merges exactly, decided before any cluster work.

PEFT's `add_weighted_adapter` runs without error on several kinds of adapter and writes a wrong
result (DoRA magnitudes, LoRA biases and modules_to_save are dropped; rsLoRA scaling is applied
twice; rank_pattern breaks the equal-rank types). Each rule here either lets raymerge handle the
feature correctly elsewhere, or refuses it naming the adapter, the feature and what to do instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymerge.errors import MergeError
from raymerge.merge.format import WEIGHT_FILES, AdapterInfo
from raymerge.merge.layout import Layer, Layout
from raymerge.merge.registry import METHODS, RankRule

if TYPE_CHECKING:
    from raymerge.merge.tensors import AdapterTensors

LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)
BASE_LAYER_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
"""A full copy of a targeted embedding's weights, which PEFT saves beside embedding LoRAs."""

# init_lora_weights values that change the base weights during training: such an adapter only
# means something on top of its own modified base, unless it was converted when saved.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModule:
    """One targeted module's factors, from the safetensors header."""

    name: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a_shape[0]


def lora_modules(tensors: dict[str, list[int]]) -> tuple[dict[str, LoraModule], list[str]]:
    """The LoRA modules in a header, and the keys that are neither LoRA factors nor base copies."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    others = []
    for key, shape in tensors.items():
        match = LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tuple(shape)
        elif not BASE_LAYER_KEY.match(key):
            others.append(key)
    modules = {}
    for name, found in parts.items():
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a = found.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = found.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a is None or b is None:
            others.append(f"{name} (lora_A without lora_B or the reverse)")
            continue
        modules[name] = LoraModule(name, a, b, embedding)
    return modules, others


def feature_problems(info: AdapterInfo) -> list[str]:
    """Adapter features that no combination type merges correctly."""
    where = f"adapter {info.name!r}"
    config = info.config
    problems = []

    def refuse(feature: str, why_and_what: str) -> None:
        problems.append(f"{where} uses {feature}: {why_and_what}")

    if config.get("use_dora"):
        refuse(
            "DoRA (use_dora: true)",
            "its magnitude vectors cannot be combined with other adapters' factors (PEFT's merge "
            "silently drops them); merge it into the base with merge_and_unload instead, or use "
            "an adapter trained without DoRA",
        )
    if config.get("lora_bias"):
        refuse(
            "lora_bias: true",
            "PEFT's merge silently drops LoRA biases; retrain with lora_bias=False or merge it "
            "into the base with merge_and_unload",
        )
    if config.get("modules_to_save"):
        refuse(
            f"modules_to_save {config['modules_to_save']}",
            "fully trained modules cannot be weight-merged (PEFT's merge keeps the base model's "
            "copy and loses the trained one); save the adapter without modules_to_save",
        )
    if config.get("target_parameters"):
        refuse(
            f"target_parameters {config['target_parameters']}",
            "add_weighted_adapter cannot merge LoRAs on nn.Parameters; target modules instead",
        )
    if config.get("trainable_token_indices"):
        refuse(
            "trainable_token_indices",
            "trained token embeddings cannot be weight-merged; save the adapter without them",
        )
    if config.get("layer_replication"):
        refuse("layer_replication", "it changes the base model's layers; merging ignores that")
    if config.get("alora_invocation_tokens"):
        refuse(
            "activated LoRA (alora_invocation_tokens)",
            "its delta applies only after the invocation tokens, which a weight merge cannot keep",
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        refuse(
            f"init_lora_weights {init!r}",
            "it was trained on a modified base model; save it with "
            "path_initial_model_for_weight_conversion so that it applies to the original base",
        )
    if info.tensors:
        problems += _tensor_problems(info)
    return problems


def _tensor_problems(info: AdapterInfo) -> list[str]:
    """The safetensors header against the config: only LoRA factors, paired, of the right rank."""
    where = f"adapter {info.name!r}: {info.weights_file}"
    modules, others = lora_modules(info.tensors)
    problems = []
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        problems.append(
            f"{where} holds tensors that are not LoRA factors ({listed}); raymerge merges "
            "lora_A/lora_B only: save the adapter without extra modules"
        )
    if not modules and not others:
        problems.append(f"{where} holds no LoRA factors (lora_A/lora_B)")
    for module in modules.values():
        if len(module.a_shape) > 2:
            problems.append(
                f"{where}: {module.name} is a convolution LoRA, which raymerge does not merge yet; "
                "leave conv layers out of target_modules"
            )
            break
        if module.b_shape[1] != module.rank:
            problems.append(
                f"{where}: {module.name} has lora_A of shape {list(module.a_shape)} but lora_B of "
                f"shape {list(module.b_shape)}: their ranks differ; the file is corrupt"
            )
        elif module.rank != expected_rank(info.config, module.name):
            problems.append(
                f"{where}: {module.name} has rank {module.rank} but adapter_config.json says "
                f"{expected_rank(info.config, module.name)}; the config does not fit the weights"
            )
    return problems


def expected_rank(config: dict[str, Any], module: str) -> int:
    """A module's rank per the config: its rank_pattern entry (PEFT's suffix match) or r."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return rank
    return config["r"]


def base_shape_problems(info: AdapterInfo, layout: Layout) -> list[str]:
    """Each LoRA factor against the base model's layer it adapts, oriented by the layer's type
    (as PEFT does: a Conv1D weight is (in, out) whatever the config's fan_in_fan_out says)."""
    if not info.tensors:
        return []
    where = f"adapter {info.name!r}"
    modules, _ = lora_modules(info.tensors)
    problems, missing = [], []
    for module in modules.values():
        layer = layout.layers.get(module.name)
        if layer is None:
            missing.append(module.name)
            continue
        if module.a_shape[1] != layer.in_features or module.b_shape[0] != layer.out_features:
            if len(problems) == 3:
                problems.append(f"{where}: further modules not checked")
                break
            problems.append(
                f"{where}: {module.name} has lora_A {list(module.a_shape)} and lora_B "
                f"{list(module.b_shape)}, which do not fit the base model's {module.name}.weight "
                f"of shape {weight_shape(layer)}; is it an adapter for another model?"
            )
    if missing:
        listed = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        problems.append(
            f"{where} targets {len(missing)} module(s) that the base model does not have "
            f"({listed}); is it an adapter for another model?"
        )
    for key, shape in info.tensors.items():
        match = BASE_LAYER_KEY.match(key)
        layer = layout.layers.get(match["module"]) if match else None
        if layer is not None and list(shape) != weight_shape(layer):
            problems.append(
                f"{where}: {key} has shape {shape} but the base model's {match['module']}.weight "
                f"is {weight_shape(layer)}: the adapter resized the vocabulary, which a merge "
                "cannot carry; merge adapters trained without resizing"
            )
    return problems


def weight_shape(layer: Layer) -> list[int]:
    """The shape of a layer's weight as the checkpoint stores it."""
    if layer.kind in ("conv1d", "embedding"):  # Conv1D is (in, out); Embedding (vocab, dim)
        return [layer.in_features, layer.out_features]
    return [layer.out_features, layer.in_features]


def check_embedding_copies(adapter: AdapterTensors, model) -> None:
    """An embedding LoRA may carry a full copy of the embedding (PEFT saves one beside it).

    Loading it overwrites the held base model's weights, so it must equal them exactly.
    """
    import torch
    from safetensors import safe_open

    weights = Path(adapter.folder, adapter.provenance.get("weights_file", WEIGHT_FILES[0]))
    if weights.suffix != ".safetensors":
        return
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            match = BASE_LAYER_KEY.match(key)
            if not match:
                continue
            module = model.get_submodule(match["module"])
            held = getattr(module, "base_layer", module).weight
            theirs = f.get_tensor(key).to(device=held.device, dtype=held.dtype)
            if not torch.equal(theirs, held.data):
                raise MergeError(
                    f"adapter {adapter.name!r} carries its own {match['module']} weights, which "
                    "differ from the base model's (a trained or resized embedding); a merge "
                    "cannot carry them: use adapters saved with save_embedding_layers=False"
                )


def group_problems(index: int, combination_types: list[str], infos: list[AdapterInfo]) -> list[str]:
    """Rules that depend on the combination type: rank_pattern breaks the equal-rank types."""
    equal_rank = [t for t in combination_types if METHODS[t].rank is RankRule.EQUAL]
    problems = []
    if equal_rank:
        for info in infos:
            if set((info.config.get("rank_pattern") or {}).values()) - {info.config["r"]}:
                problems.append(
                    f"combinations[{index}]: adapter {info.name!r} has per-module ranks "
                    f"(rank_pattern), which {', '.join(equal_rank)} cannot merge (PEFT writes an "
                    "adapter that does not reload); use cat or an svd type for it"
                )
    return problems
