"""`raymerge bench cluster`: a large sweep on a simulated multi-node Ray cluster
(`ray.cluster_utils.Cluster`: a head and several nodes with logical GPUs, as separate raylets on
this machine), one worker per GPU, pinned across the nodes. Reports each worker's utilisation
(busy time over the sweep's wall time), the driver's CPU seconds per 1,000 merges and its peak
memory.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "v_proj")


def bench_cluster(
    root: Path,
    *,
    merges: int = 100_000,
    nodes: int = 4,
    gpus_per_node: int = 2,
    adapters: int = 16,
    log=print,
) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from raymerge.cluster.driver import run_sweep

    log(f"building {adapters} adapters on a tiny base model")
    plan, spec = _sweep(root, merges, nodes * gpus_per_node, adapters)
    log(f"starting a simulated cluster: {nodes} nodes x {gpus_per_node} GPUs")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node_ids = [
        cluster.add_node(num_cpus=gpus_per_node, num_gpus=gpus_per_node) for _ in range(nodes)
    ]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        log(f"running {plan.total():,} merges on {spec['workers']} workers")
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        summary = run_sweep(plan)
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root / "output", ignore_errors=True)
    busy = {k: w.busy_seconds / summary.merge_seconds for k, w in summary.workers.items()}
    return {
        "merges": summary.done,
        "failed": summary.failed,
        "nodes": len(node_ids),
        "workers": len(summary.workers),
        "worker_nodes": len({w.node for w in summary.workers.values()}),
        "wall_seconds": round(wall, 1),
        "dispatch_seconds": summary.merge_seconds,
        "merges_per_s": summary.merges_per_s,
        "utilisation_min": round(min(busy.values()), 3),
        "utilisation_mean": round(sum(busy.values()) / len(busy), 3),
        "utilisation_by_worker": {k: round(v, 3) for k, v in sorted(busy.items())},
        "driver_cpu_seconds_per_1000_merges": round(1000 * cpu / max(summary.done, 1), 2),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _sweep(root: Path, merges: int, workers: int, adapters: int):
    """The plan (and spec) of about `merges` linear and cat merges of pairs of tiny adapters."""
    import yaml

    from raymerge.demo.world import AdapterShape, build_world
    from raymerge.sweep.plan import load_plan

    shape = AdapterShape(r=4, lora_alpha=8, target_modules=TARGETS)
    names = [f"adapter{i:02d}" for i in range(adapters)]
    world = build_world(root / "world", dict.fromkeys(names, shape), hidden_size=64, layers=2)
    types = ["linear", "cat"]
    weightings = math.ceil(merges / (math.comb(adapters, 2) * len(types)))
    spec = {
        "base_model": str(world.base_model),
        "adapters": {n: str(p) for n, p in world.adapters.items()},
        "combinations": [
            {
                "choose": 2,
                "weights": [[round(i / weightings, 6), 1.0] for i in range(weightings)],
                "methods": [{"combination_type": types}],
            }
        ],
        "output": str(root / "output"),
        "workers": workers,
        "gpus_per_worker": 1,
        "cpus_per_worker": 1,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_plan(path), spec


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
