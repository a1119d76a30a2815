"""`raymerge bench`: measurements reported from one run on one machine (never timed tests).

`plan`: how long the driver takes to expand and dispatch-order a huge sweep, and its peak memory,
with the adapter loads that locality-aware dispatch saves over round-robin (simulated workers with
LRU caches, no Ray and no merging: the driver's own cost).
"""

from __future__ import annotations

import math
import resource
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from raymerge.adapters import AdapterInfo
from raymerge.plan import Plan
from raymerge.schedule import LocalityScheduler, RoundRobinScheduler
from raymerge.spec import parse_spec


def synthetic_plan(merges: int, adapters: int = 64) -> Plan:
    """A plan of at least `merges` merges over all pairs of `adapters` adapters (no files)."""
    names = [f"adapter{i:03d}" for i in range(adapters)]
    pairs = math.comb(adapters, 2)
    densities = [round(0.05 + 0.1 * i, 2) for i in range(9)]  # ties grid: 9 values, + linear = 10
    vectors = max(1, math.ceil(merges / (pairs * (1 + len(densities)))))
    spec = parse_spec(
        {
            "base_model": "/models/base",
            "adapters": {n: f"s3://bucket/adapters/{n}" for n in names},
            "combinations": [
                {
                    "choose": 2,
                    "weights": [
                        [round(1 - i / vectors, 6), round(i / vectors, 6)] for i in range(vectors)
                    ],
                    "methods": [
                        {"combination_type": "linear"},
                        {"combination_type": "ties", "density": densities},
                    ],
                }
            ],
            "output": "s3://bucket/sweeps/bench",
        }
    )
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32}
    infos = {
        n: AdapterInfo(n, spec.adapters[n], config, "adapter_model.safetensors") for n in names
    }
    return Plan(spec, Path("bench.yaml"), spec.base_model, spec.output, infos)


def simulate_dispatch(plan: Plan, scheduler_kind: str, workers: int, cache: int) -> dict[str, int]:
    """Feed every task to `workers` equally fast simulated workers with LRU caches of `cache`
    adapters; count the adapter loads that dispatch order causes."""
    tasks = plan.tasks()
    if scheduler_kind == "round_robin":
        scheduler = RoundRobinScheduler(tasks, range(workers))
    else:
        scheduler = LocalityScheduler(tasks)
    caches = [OrderedDict() for _ in range(workers)]
    loads = dispatched = 0
    active = list(range(workers))
    while active:
        for worker in list(active):
            task = scheduler.next_for(worker, caches[worker].keys())
            if task is None:
                active.remove(worker)
                continue
            dispatched += 1
            held = caches[worker]
            for name in task.adapters:
                if name in held:
                    held.move_to_end(name)
                else:
                    held[name] = True
                    loads += 1
            while len(held) > cache:
                held.popitem(last=False)
    return {"dispatched": dispatched, "adapter_loads": loads}


def bench_plan(merges: int = 1_000_000, workers: int = 8, cache: int = 8) -> dict[str, Any]:
    """Plan + count + dispatch-order a sweep of `merges` merges, as the driver does."""
    started = time.perf_counter()
    plan = synthetic_plan(merges)
    total = sum(1 for _ in plan.tasks())  # the driver's counting pass
    planned = time.perf_counter()
    locality = simulate_dispatch(plan, "locality", workers, cache)
    ordered = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    round_robin = simulate_dispatch(plan, "round_robin", workers, cache)
    return {
        "merges": total,
        "adapters": len(plan.adapters),
        "workers": workers,
        "cache_adapters": cache,
        "plan_and_count_seconds": round(planned - started, 2),
        "dispatch_order_seconds": round(ordered - planned, 2),
        "total_seconds": round(ordered - started, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "adapter_loads_locality": locality["adapter_loads"],
        "adapter_loads_round_robin": round_robin["adapter_loads"],
        "dispatched": locality["dispatched"],
    }


PRUNING_DENSITY = 0.5


def _method(combination_type: str) -> dict[str, Any]:
    from raymerge.methods import method as lookup

    method: dict[str, Any] = {"combination_type": combination_type}
    if "density" in lookup(combination_type).required():
        method["density"] = PRUNING_DENSITY
    return method


def bench_merge(
    root: Path,
    *,
    hidden_size: int = 1024,
    layers: int = 4,
    rank: int = 8,
    adapters: int = 6,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    types: tuple[str, ...] = ("linear", "cat", "ties", "svd"),
    threads: int = 2,
    log=print,
) -> dict[str, Any]:
    """One sweep (every pair of the adapters, each type) timed four ways on this machine:
    the plain PEFT loop a user would write, raymerge with engine peft, raymerge with engine fast,
    and the I/O floor (writing the same files, nothing else)."""
    import torch

    from raymerge.world import AdapterShape, build_world

    torch.set_num_threads(threads)
    shape = AdapterShape(r=rank, lora_alpha=2 * rank, target_modules=tuple(targets))
    log(f"building the world: hidden {hidden_size}, {layers} layers, {adapters} adapters, r={rank}")
    world = build_world(
        root / "world",
        {f"adapter{i}": shape for i in range(adapters)},
        hidden_size=hidden_size,
        layers=layers,
    )
    pairs = math.comb(adapters, 2)
    figures: dict[str, Any] = {
        "world": {
            "hidden_size": hidden_size,
            "layers": layers,
            "rank": rank,
            "adapters": adapters,
            "targets": list(targets),
            "merges_per_type": pairs,
            "threads": threads,
        },
        "types": {t: {} for t in types},
    }
    log("timing the plain PEFT loop")
    plain = _plain_peft_loop(world, types, root / "plain")
    figures["plain_peft_loop"] = {"end_to_end_seconds": plain.pop("end_to_end_seconds")}
    for t in types:
        figures["types"][t]["plain_peft_loop"] = round(pairs / plain[t], 2)
    for engine in ("peft", "fast"):
        log(f"timing raymerge, engine {engine}")
        summary, per_type = _raymerge_run(world, types, root / engine, engine, threads)
        figures[f"raymerge_{engine}"] = {
            "end_to_end_seconds": summary.seconds,
            "steady_merges_per_s": summary.merges_per_s,
        }
        for t in types:
            figures["types"][t][f"raymerge_{engine}"] = round(pairs / per_type[t], 2)
    log("timing the I/O floor")
    floor = _io_floor(root / "fast", root / "floor")
    for t in types:
        row = figures["types"][t]
        row["io_floor"] = round(pairs / floor[t], 2)
        row["fast_over_plain"] = round(row["raymerge_fast"] / row["plain_peft_loop"], 2)
        row["fast_over_peft"] = round(row["raymerge_fast"] / row["raymerge_peft"], 2)
        row["fast_time_over_io_floor"] = round(row["io_floor"] / row["raymerge_fast"], 2)
    return figures


def _plain_peft_loop(world, types, out: Path) -> dict[str, float]:
    """Base and adapters loaded once; per merge add_weighted_adapter, save_pretrained of the
    merged adapter alone, delete_adapter. Seconds per type, and end to end."""
    import itertools

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
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
    seconds["end_to_end_seconds"] = round(time.perf_counter() - started, 2)
    return seconds


def _raymerge_run(world, types, out: Path, engine: str, threads: int):
    """A raymerge sweep on a fresh local Ray instance with one worker of `threads` CPUs; the
    per-type time is the worker's own time per merge (merging and writing)."""
    import yaml

    from raymerge.driver import run_sweep
    from raymerge.manifest import read_manifest
    from raymerge.plan import load_plan

    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "base_model": str(world.base_model),
        "adapters": {name: str(path) for name, path in world.adapters.items()},
        "combinations": [
            {
                "choose": 2,
                "weights": [[0.5, 0.5]],
                "methods": [_method(t) for t in types],
            }
        ],
        "output": str(out / "output"),
        "workers": 1,
        "cpus_per_worker": threads,
        "engine": engine,
    }
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_sweep(load_plan(path))
    if summary.failed:
        raise RuntimeError(f"bench sweep had failures: {summary.failures[:3]}")
    per_type = dict.fromkeys(types, 0.0)
    for line in read_manifest(str(out / "output")):  # steady state: adapter loading excluded
        per_type[line["combination_type"]] += line["seconds"] - (line["load_seconds"] or 0.0)
    return summary, per_type


def _io_floor(source: Path, out: Path) -> dict[str, float]:
    """Seconds per type to serialise and write the same files (tensors already in memory)."""
    import json

    from safetensors.torch import load_file, save_file

    from raymerge import storage
    from raymerge.manifest import read_manifest

    seconds: dict[str, float] = {}
    for line in read_manifest(str(source / "output")):
        folder = Path(line["path"])
        tensors = load_file(folder / "adapter_model.safetensors")
        config = (folder / "adapter_config.json").read_bytes()
        record = json.loads((folder / "merge.json").read_text())
        target = out / line["merge_id"]
        begin = time.perf_counter()
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        storage.write_bytes(str(target / "adapter_config.json"), config)
        storage.write_bytes(str(target / "merge.json"), json.dumps(record, indent=2).encode())
        elapsed = time.perf_counter() - begin
        seconds[line["combination_type"]] = seconds.get(line["combination_type"], 0.0) + elapsed
    return seconds
