"""Shared test helpers: specs on disk, reference merges through PEFT, tensor comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from raymerge.world import World


def write_spec(folder: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(world: World, output: str | Path, **overrides: Any) -> dict[str, Any]:
    """A valid spec over the world's adapters; `overrides` replace top-level keys."""
    spec = {
        "base_model": str(world.base_model),
        "adapters": {name: str(path) for name, path in world.adapters.items()},
        "combinations": [
            {
                "adapters": ["a", "b"],
                "weights": [[0.5, 0.5]],
                "methods": [{"combination_type": "linear"}],
            }
        ],
        "output": str(output),
        "workers": 2,
        "gpus_per_worker": 1,
        "seed": 0,
    }
    spec.update(overrides)
    return spec


def reference_merge(
    base_model: Path,
    adapter_dirs: list[Path],
    weights: list[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
) -> dict[str, torch.Tensor]:
    """What calling add_weighted_adapter directly on a PeftModel gives (the user's own loop)."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model), adapter_dirs[0], adapter_name="in0"
    )
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"in{i}")
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        [f"in{i}" for i in range(len(adapter_dirs))],
        weights,
        "merged",
        combination_type=combination_type,
        **params,
    )
    return get_peft_model_state_dict(model, adapter_name="merged")


def reload_merged(base_model: Path, merged_dir: Path) -> PeftModel:
    """A written merge, loaded the way a user would: PeftModel.from_pretrained on a fresh base."""
    base = AutoModelForCausalLM.from_pretrained(base_model)
    return PeftModel.from_pretrained(base, merged_dir, adapter_name="merged")


def assert_tensors_match(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float
) -> None:
    """Same tensor names and shapes, and per-tensor relative error ||a - e|| / ||e|| <= rel."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, name
        err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
        assert err <= rel, f"{name}: relative error {err:.3e} > {rel}"
