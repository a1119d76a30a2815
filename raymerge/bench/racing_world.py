"""The worlds `raymerge bench racing` races: the tiny demo's (its three trained adapters, a
fourth of random factors, five eval sets of `examples` each, a 216-merge grid) or the real
model's (the real demo's adapters, grid, generation sets and objective); each as a spec whose
paths are relative to `root/demo`, where the bench's runs are written."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = 256
WEIGHTS = ([0.5, 0.5], [0.7, 0.3], [0.3, 0.7], [1.0, 1.0], [0.9, 0.1], [0.1, 0.9])
METHODS = (
    {"combination_type": "linear"},
    {"combination_type": "cat"},
    {"combination_type": "ties", "density": 0.5},
    {"combination_type": "dare_linear", "density": 0.7},
    {"combination_type": "svd", "svd_rank": 8},
    {"combination_type": "core_ties", "density": 0.5, "svd_rank": 8},
)
NOISE = "noise"
"""The fourth adapter: random factors, of the trained adapters' shapes and spreads."""


@dataclass(frozen=True)
class World:
    """What the bench races: the model, the sizes of the grid and of its eval sets."""

    model: str = "tiny"
    """tiny: the 64-wide demo world with the noise adapter (the grid above); real: the real
    model's demo (SmolLM2-135M-Instruct, its three skill adapters, its 48-merge grid, one
    generation set per skill, ranked by the real demo's objective)."""
    examples: int = EXAMPLES
    weights: tuple = WEIGHTS
    methods: tuple = METHODS
    sets: tuple[str, ...] | None = None
    """The eval sets scored (default: all five of the demo's kinds)."""


def racing_spec(root: Path, world: World, workers: int, log=print) -> dict[str, Any]:
    """The demo's world under `root/demo` (trained once), the noise adapter, the bench's eval
    sets, and the grid's spec (paths relative to `root/demo`, where its runs are written)."""
    from raymerge.demo.demo import demo_spec, prepare_demo

    if world.model == "real":
        return real_racing_spec(root, world, workers, log)
    folder = prepare_demo(root / "demo", workers=1, log=log).parent
    noise = folder / "world" / "adapters" / NOISE
    if not noise.exists():
        noise_adapter(folder / "world" / "adapters" / "sums", noise, seed=7)
    sets = write_sets(folder / "bench-eval", world.examples)
    spec = demo_spec(workers)
    evaluate = spec["evaluate"]
    datasets = {}
    for name, entry in evaluate["datasets"].items():
        if world.sets is None or name in world.sets:
            path = f"./bench-eval/{Path(sets[name]).name}"
            datasets[name] = {**entry, "path": path} if isinstance(entry, dict) else path
    texts = [name for name, entry in datasets.items() if isinstance(entry, str)]
    objective = [t for t in evaluate["objective"] if _term_set(t["metric"], texts) in datasets]
    spec["adapters"] = {**spec["adapters"], NOISE: f"./world/adapters/{NOISE}"}
    spec["combinations"] = [
        {"choose": 2, "weights": [list(w) for w in world.weights], "methods": list(world.methods)}
    ]
    spec["evaluate"] = {
        **evaluate,
        "datasets": datasets,
        "max_samples": world.examples,
        "objective": objective,
    }
    spec["cpus_per_worker"] = 1
    return spec


def real_racing_spec(root: Path, world: World, workers: int, log=print) -> dict[str, Any]:
    """The real demo under `root/demo`, its generation sets drawn with `world.examples` held-out
    items each, its grid and objective (its own racing left to the bench)."""
    from raymerge.demo.real_demo import prepare_real_demo, real_demo_spec, write_eval_sets

    folder = prepare_real_demo(root / "demo", log=log).parent
    write_eval_sets(folder / "bench-eval", world.examples)
    spec = real_demo_spec()
    spec.pop("search")  # the bench searches on its own (search_figures)
    evaluate = spec["evaluate"]
    evaluate.pop("racing")
    evaluate["datasets"] = {
        name: {**entry, "path": f"./bench-eval/{name}.jsonl"}
        for name, entry in evaluate["datasets"].items()
        if isinstance(entry, dict)  # the generation sets, which the objective reads
    }
    evaluate["max_samples"] = world.examples
    return {**spec, "workers": workers, "cpus_per_worker": 2 if workers == 1 else 1}


def _term_set(metric: str, texts: list[str]) -> str | None:
    """The eval set an objective term reads (mean_loss: the first text set, None without)."""
    if metric == "mean_loss":
        return texts[0] if texts else None
    return metric.rpartition(".")[0]


def noise_adapter(trained: Path, path: Path, *, seed: int) -> Path:
    """An adapter of `trained`'s config and tensor shapes, every tensor drawn from a normal of
    that tensor's own spread (seeded: the same bytes every time)."""
    import torch
    from safetensors.torch import load_file, save_file

    from raymerge.merge.format import CONFIG_FILE, SAFETENSORS_METADATA, WEIGHTS_FILE

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, tensor in sorted(load_file(trained / WEIGHTS_FILE).items()):
        drawn = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        tensors[key] = (drawn * tensor.double().std()).to(tensor.dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
    shutil.copyfile(trained / CONFIG_FILE, path / CONFIG_FILE)
    return path


def write_sets(folder: Path, examples: int) -> dict[str, str]:
    """The demo's five eval sets with `examples` each (drawn with the demo's seeds, so the
    first 64 are the demo's own); their paths by set name."""
    from raymerge.demo.demo import TASKS, choice_examples, task_examples, task_texts

    rows = {task: [{"text": t} for t in task_texts(task, examples, 999)] for task in TASKS}
    rows["upper_choice"] = choice_examples(examples, seed=998)
    rows["sums_gen"] = [
        {"prompt": p, "answer": a} for p, a in task_examples("sums", examples, seed=997)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in rows.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        paths[name] = str(path)
    return paths
