"""`raymerge bench plan`: how long the driver takes to expand and dispatch-order a huge sweep,
and its peak memory, with the adapter loads that locality-aware dispatch saves over round-robin
(simulated workers with LRU caches, no Ray and no merging: the driver's own cost). Each size runs
in a process of its own, so that its peak memory is its own.
"""

from __future__ import annotations

import math
import resource
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from raymerge.cluster.schedule import LocalityScheduler, RoundRobinScheduler
from raymerge.load.adapters import AdapterInfo
from raymerge.sweep.plan import Plan
from raymerge.sweep.spec import parse_spec


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


def bench_plans(sizes: list[int], workers: int = 8, cache: int = 8) -> list[dict[str, Any]]:
    """`bench_plan` for each size, each in a fresh process (peak memory is per process)."""
    import json
    import subprocess
    import sys

    figures = []
    for merges in sizes:
        code = (
            "import json, sys; from raymerge.bench.plan import bench_plan; "
            f"print(json.dumps(bench_plan({merges}, {workers}, {cache})))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        figures.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return figures


def bench_plan(merges: int = 1_000_000, workers: int = 8, cache: int = 8) -> dict[str, Any]:
    """Plan + count + dispatch-order a sweep of `merges` merges, as the driver does."""
    started = time.perf_counter()
    plan = synthetic_plan(merges)
    total = plan.total()  # the driver's counting pass (no merge is hashed to count it)
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
