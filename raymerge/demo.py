"""`raymerge demo`: a tiny world and a sweep over it, all local, no network."""

from __future__ import annotations

from pathlib import Path

import yaml

from raymerge.world import AdapterShape, build_world

DEMO_ADAPTERS = {
    "math": AdapterShape(r=8, lora_alpha=16),
    "code": AdapterShape(r=8, lora_alpha=16),
    "chat": AdapterShape(r=8, lora_alpha=8),
    "style": AdapterShape(r=4, lora_alpha=8),
}


def demo_spec(workers: int) -> dict:
    """A small sweep touching most combination types, explicit sets and `choose` alike."""
    return {
        "base_model": "./world/base",
        "adapters": {name: f"./world/adapters/{name}" for name in DEMO_ADAPTERS},
        "combinations": [
            {
                "adapters": ["math", "code"],
                "weights": [[0.5, 0.5], [0.7, 0.3]],
                "methods": [
                    {"combination_type": "linear"},
                    {"combination_type": "ties", "density": 0.5},
                    {"combination_type": "dare_linear", "density": 0.7},
                    {"combination_type": "svd", "svd_rank": 8},
                ],
            },
            {
                "choose": 2,
                "from": ["math", "code", "chat"],
                "weights": [[1.0, 1.0]],
                "methods": [
                    {"combination_type": "cat"},
                    {"combination_type": "magnitude_prune", "density": 0.5},
                ],
            },
            {
                "adapters": ["math", "style"],
                "weights": [[1.0, -0.5]],
                "methods": [
                    {"combination_type": "cat"},
                    {"combination_type": ["svd", "dare_ties_svd"], "density": 0.5},
                ],
            },
        ],
        "output": "./merges-out",
        "workers": workers,
        "gpus_per_worker": 0,
        "seed": 0,
    }


def prepare_demo(out: Path, workers: int) -> Path:
    """Build the demo world under `out` (once) and write its sweep spec; returns the spec path."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "world" / "adapters" / "style" / "adapter_config.json").exists():
        build_world(out / "world", DEMO_ADAPTERS)
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(workers), sort_keys=False))
    return spec_path
