"""Starting the merge workers: one Ray actor per worker, each in its own placement group, with
explicit CPUs and GPUs; the check that a fixed-size cluster can hold them; stopping them.

Usage (on a Ray connection)::

    actors, groups, nodes = start_workers(plan, start_timeout=600, fixed_size=True)
    ...
    stop_workers(actors, groups)
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymerge.cluster.executor import CALLS_PER_WORKER
from raymerge.cluster.session import root_error
from raymerge.cluster.worker import MergeWorker
from raymerge.errors import ClusterError
from raymerge.sweep.plan import Plan


def start_workers(plan: Plan, start_timeout: float, fixed_size: bool, digests=None):
    """Start `workers` actors, each in its own placement group, and wait until each is up.
    Returns the actors by index, their placement groups, and the node each runs on by index."""
    spec = plan.spec
    if fixed_size:
        check_resources(spec)
    config = plan.worker_config()
    # One bundle per worker, STRICT_PACK: a worker's GPUs are reserved together, on one node.
    bundle = {"CPU": spec.reserved_cpus, "GPU": spec.gpus_per_worker}
    groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(spec.workers)]
    actor = ray.remote(MergeWorker)
    workers = {
        i: actor.options(
            num_cpus=spec.reserved_cpus,
            num_gpus=spec.gpus_per_worker,
            max_restarts=spec.max_worker_restarts,
            max_concurrency=CALLS_PER_WORKER,  # one merging, one waiting for its writes
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0),
        ).remote(i, config, digests)
        for i, group in enumerate(groups)
    }
    try:
        infos = ray.get([w.info.remote() for w in workers.values()], timeout=start_timeout)
    except GetTimeoutError:
        stop_workers(workers, groups)
        raise ClusterError(
            f"the {spec.workers} merge workers did not all start within {start_timeout:.0f} s; "
            f"each needs {spec.reserved_cpus:g} CPU and {spec.gpus_per_worker:g} GPU on one "
            f"node, and the cluster has {_free_resources()} available; lower `workers` or "
            "`gpus_per_worker`, or add nodes"
        ) from None
    except RayActorError as exc:
        stop_workers(workers, groups)
        raise ClusterError(f"a merge worker failed to start: {root_error(exc)}") from None
    return workers, groups, {info["index"]: info["node_id"] for info in infos}


def stop_workers(workers: dict[int, Any], groups: list) -> None:
    """Kill the actors for good (no restart) and free their placement groups."""
    for worker in workers.values():
        ray.kill(worker, no_restart=True)
    for group in groups:
        remove_placement_group(group)


def check_resources(spec) -> None:
    """Fail fast when a cluster that cannot grow will never fit the workers."""
    total = ray.cluster_resources()
    need_gpus = spec.workers * spec.gpus_per_worker
    need_cpus = spec.workers * spec.reserved_cpus
    if need_gpus > total.get("GPU", 0) or need_cpus > total.get("CPU", 0):
        raise ClusterError(
            f"workers={spec.workers} need {need_cpus:g} CPU and {need_gpus:g} GPU "
            f"(cpus_per_worker={spec.reserved_cpus:g}, gpus_per_worker={spec.gpus_per_worker:g})"
            f" but this Ray instance has {total.get('CPU', 0):g} CPU and "
            f"{total.get('GPU', 0):g} GPU; lower them (gpus_per_worker: 0 runs on CPU) or use "
            "a cluster with more resources (--address)"
        )


def _free_resources() -> str:
    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU"
