"""`raymerge bench merge`: one sweep per combination type, measured three ways on this machine:

- the plain PEFT loop a user would write (base and adapters loaded once; per merge
  `add_weighted_adapter` -> `save_pretrained(selected_adapters=...)` -> `delete_adapter`);
- `raymerge run` as a user gets it — driver, scheduling, merging, merge.json, manifest and commit
  included — in the steady state: two sweeps, of K merges and of W·K (W chosen so that the extra
  merges take about 30 s), whose difference in wall time is the cost of the extra merges with
  start-up cancelled out;
- the I/O floor: serialising and writing the same files, and nothing else.

`shape="llama-8b"` measures at a size users run (Llama-3.1-8B's layers, r=16 on all seven linear
layers, bf16: ~84 MB per adapter) with a config-only base model: no weights exist, none are
needed to merge, and the plain PEFT loop cannot run (it needs the weights).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

PRUNING_DENSITY = 0.5
DEFAULT_TYPES = ("linear", "cat", "ties", "dare_linear", "magnitude_prune", "svd")


def _method(combination_type: str) -> dict[str, Any]:
    from raymerge.merge.registry import method as lookup

    method: dict[str, Any] = {"combination_type": combination_type}
    if "density" in lookup(combination_type).required():
        method["density"] = PRUNING_DENSITY
    return method


def bench_merge(
    root: Path,
    *,
    shape: str = "default",
    hidden_size: int = 1024,
    layers: int = 4,
    rank: int = 8,
    adapters: int = 6,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    types: tuple[str, ...] = DEFAULT_TYPES,
    threads: int = 2,
    steady_seconds: float = 30.0,
    log=print,
) -> dict[str, Any]:
    """Figures per type: merges/s three ways, their ratios, MB/s, and peak memory."""
    import torch

    from raymerge.cluster.session import ray_session

    torch.set_num_threads(threads)
    names = [f"adapter{i}" for i in range(adapters)]
    world = _world(root / "world", shape, names, hidden_size, layers, rank, targets, log)
    pairs = math.comb(adapters, 2)
    figures: dict[str, Any] = {
        "world": {
            "shape": shape,
            "adapters": adapters,
            "merges_per_sweep": pairs,
            "adapter_mb": round(_size(world.adapters[names[0]]) / 2**20, 1),
            "threads": threads,
        },
        "types": {},
    }
    plain: dict[str, float] = {}
    if shape == "default":
        figures["world"].update(hidden_size=hidden_size, layers=layers, rank=rank)
        figures["world"]["targets"] = list(targets)
        peft_types = [t for t in types if _is_peft_type(t)]  # raymerge's own: no plain loop
        log("timing the plain PEFT loop")
        plain = _plain_peft_loop(world, peft_types, root / "plain")
    # As `raymerge run` does: this process's Ray connection, else RAY_ADDRESS, else a local
    # instance of this size.
    with ray_session(None, num_cpus=threads + 1, num_gpus=0, log_to_driver=False):
        for combination_type in types:
            log(f"timing raymerge run and the I/O floor: {combination_type}")
            row = _raymerge_steady(
                world, combination_type, root / combination_type, threads, steady_seconds
            )
            if combination_type in plain:
                row["plain_peft_loop"] = round(pairs / plain[combination_type], 2)
                row["raymerge_over_plain"] = round(row["raymerge"] / row["plain_peft_loop"], 2)
            figures["types"][combination_type] = row
            shutil.rmtree(root / combination_type, ignore_errors=True)  # GBs at real sizes
    figures["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return figures


def _world(folder: Path, shape: str, names, hidden_size, layers, rank, targets, log):
    """The bench's base model and adapters: built at `hidden_size`, or config-only at a named
    shape (no weights exist, none are needed to merge)."""
    from raymerge.demo.world import AdapterShape, build_config_only_world, build_world

    if shape != "default":
        log(f"building a {shape} world: config only, {len(names)} adapters of r=16, bf16")
        return build_config_only_world(folder, shape, names)
    log(f"building the world: hidden {hidden_size}, {layers} layers, {len(names)} adapters")
    spec_shape = AdapterShape(r=rank, lora_alpha=2 * rank, target_modules=tuple(targets))
    return build_world(
        folder, dict.fromkeys(names, spec_shape), hidden_size=hidden_size, layers=layers
    )


def _is_peft_type(combination_type: str) -> bool:
    from raymerge.merge.registry import method as lookup

    return lookup(combination_type).peft


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _plain_peft_loop(world, types, out: Path) -> dict[str, float]:
    """Seconds per type for every pair: add_weighted_adapter, save_pretrained of the merged
    adapter alone, delete_adapter (base and adapters loaded once)."""
    import itertools

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(world.adapters)
    base = AutoModelForCausalLM.from_pretrained(world.base_model)
    model = PeftModel.from_pretrained(base, world.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(world.adapters[name], adapter_name=name)
    seconds = {}
    for combination_type in types:
        params = {k: v for k, v in _method(combination_type).items() if k != "combination_type"}
        begin = time.perf_counter()
        for i, pair in enumerate(itertools.combinations(names, 2)):
            model.add_weighted_adapter(list(pair), [0.5, 0.5], "merged", combination_type, **params)
            model.save_pretrained(
                str(out / combination_type / str(i)), selected_adapters=["merged"]
            )
            model.delete_adapter("merged")
        seconds[combination_type] = time.perf_counter() - begin
    shutil.rmtree(out, ignore_errors=True)
    return seconds


MAX_WEIGHTINGS = 200


def _raymerge_steady(
    world, combination_type: str, out: Path, threads: int, steady_seconds: float
) -> dict[str, Any]:
    """Two whole sweeps (every pair at one weighting, then at W, with W chosen from the first
    sweep's merge time so that the extra merges take about `steady_seconds`): the difference of
    their wall times is the steady-state cost of the extra merges, start-up cancelled out. Start-up
    varies by about a second between two runs, so the extra merges must take far longer."""
    small = _raymerge_run(world, combination_type, out / "small", threads, 1)
    per_weighting = max(small["merge_seconds"], 1e-3)
    weightings = min(MAX_WEIGHTINGS, max(2, math.ceil(1 + steady_seconds / per_weighting)))
    large = _raymerge_run(world, combination_type, out / "large", threads, weightings)
    merges = large["done"] - small["done"]
    seconds = large["seconds"] - small["seconds"]
    floor_seconds, megabytes = _io_floor(out / "large" / "output", out / "floor")
    per_merge_mb = megabytes / large["done"]
    rate = merges / seconds
    floor_rate = large["done"] / floor_seconds
    return {
        "raymerge": round(rate, 2),
        "io_floor": round(floor_rate, 2),
        "raymerge_time_over_io_floor": round(floor_rate / rate, 2),
        "raymerge_mb_per_s": round(rate * per_merge_mb, 1),
        "io_floor_mb_per_s": round(floor_rate * per_merge_mb, 1),
        "mb_per_merge": round(per_merge_mb, 1),
        "worker_peak_rss_mb": large["worker_peak_rss_mb"],
        "stage_ms_per_merge": {
            stage: round(1000 * seconds / large["done"], 3)
            for stage, seconds in large["stage_seconds"].items()
        },
        "whole_runs": f"{small['done']} in {small['seconds']:.1f} s, "
        f"{large['done']} in {large['seconds']:.1f} s",
    }


def _raymerge_run(world, combination_type, out: Path, threads: int, weightings: int) -> dict:
    import yaml

    from raymerge.cluster.driver import run_sweep
    from raymerge.sweep.plan import load_plan

    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "base_model": str(world.base_model),
        "adapters": {name: str(path) for name, path in world.adapters.items()},
        "combinations": [
            {
                "choose": 2,
                "weights": [[0.5, round(0.5 + 0.001 * i, 3)] for i in range(weightings)],
                "methods": [_method(combination_type)],
            }
        ],
        "output": str(out / "output"),
        "workers": 1,
        "cpus_per_worker": threads,
    }
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    summary = run_sweep(load_plan(path))
    seconds = time.perf_counter() - started
    if summary.failed:
        raise RuntimeError(f"bench sweep had failures: {summary.failures[:3]}")
    return {
        "done": summary.done,
        "seconds": round(seconds, 3),
        "merge_seconds": summary.merge_seconds,
        "worker_peak_rss_mb": max(w.peak_rss_mb for w in summary.workers.values()),
        "stage_seconds": summary.stage_seconds,
    }


def _io_floor(source: Path, out: Path) -> tuple[float, float]:
    """Seconds to serialise and write the same files (tensors already in memory), and MB."""
    from safetensors.torch import load_file, save_file

    from raymerge.merge.format import CONFIG_FILE, SAFETENSORS_METADATA, WEIGHTS_FILE
    from raymerge.store import storage
    from raymerge.store.manifest import read_manifest

    seconds = megabytes = 0.0
    for line in read_manifest(str(source)):
        folder = Path(line["path"])
        tensors = load_file(folder / WEIGHTS_FILE)
        config = (folder / CONFIG_FILE).read_bytes()
        record = json.loads((folder / "merge.json").read_text())
        target = out / line["merge_id"]
        begin = time.perf_counter()
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / WEIGHTS_FILE), metadata=SAFETENSORS_METADATA)
        storage.write_bytes(str(target / CONFIG_FILE), config)
        storage.write_bytes(str(target / "merge.json"), json.dumps(record, indent=2).encode())
        seconds += time.perf_counter() - begin
        megabytes += (line["bytes"]) / 2**20
        shutil.rmtree(target)
    return seconds, megabytes
