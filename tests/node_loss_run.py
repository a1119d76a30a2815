"""The scenario of test_node_loss.py's cluster test, in a process of its own (the test process may
hold the session's Ray instance): a simulated cluster (`ray.cluster_utils.Cluster`: a head with
no CPUs and two nodes of 1 CPU and 1 logical GPU, each a raylet on this machine), a sweep of two
workers, one per node; once merges are committed, one worker's node is killed (SIGKILL, no drain)
and a new node added. Ray restarts that worker there; the run must take it up again.

    python tests/node_loss_run.py SPEC REPORT   # REPORT: JSON with the summary; exit 1 if not
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

# Ray notices a lost node after health_check_failure_threshold missed checks, one each
# health_check_period_ms: 15 s by default; 3 s here, so the test does not wait for it.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
STARTED = time.monotonic()


def say(what: str) -> None:
    """A step of the scenario, for the test to show if it fails (Ray's own lines are noise)."""
    print(f"[scenario {time.monotonic() - STARTED:5.1f} s] {what}", flush=True)


def main(spec_path: str, report: Path) -> None:
    import ray
    from helpers import SweepThread, wait_for_commits
    from ray.cluster_utils import Cluster

    from raymerge.sweep.plan import load_plan

    plan = load_plan(spec_path)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH}
    )
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    paused = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        sweep = SweepThread(plan)

        def committed() -> set[str]:
            return {p.parent.name for p in Path(plan.output).glob("merges/*/merge.json")}

        def started() -> bool:
            return not sweep.running() or len(_workers()) == 2

        _wait(started, 150, "the two merge workers did not start")
        assert sweep.running(), f"the sweep ended early: {sweep.error}"
        victim, survivor = _workers()
        say(f"workers up: {victim.actor_id} (to lose) and {survivor.actor_id}")
        wait_for_commits(lambda: len(committed()), 6, sweep.running, timeout=60)
        # The survivor is paused until the restarted worker has committed merges: it cannot
        # finish the sweep alone meanwhile, and every merge committed then is the other's.
        os.kill(survivor.pid, signal.SIGSTOP)
        paused = survivor.pid
        say(f"{len(committed())} merges committed; survivor paused; removing a node")
        lost = next(node for node in nodes if node.node_id == victim.node_id)
        cluster.remove_node(lost, allow_graceful=False)
        cluster.add_node(num_cpus=1, num_gpus=1)
        say("node removed, another added")
        _wait(lambda: _restarted(victim.actor_id), 120, "Ray did not restart the lost worker")
        before = committed()
        say(f"Ray restarted the lost worker; {len(before)} merges committed")
        _wait(lambda: len(committed()) >= len(before) + 3, 60, "the restarted worker got no work")
        say(f"{len(committed()) - len(before)} merges committed since; survivor resumed")
        os.kill(paused, signal.SIGCONT)
        paused = None
        sweep.join(180)
        say("sweep done")
        if sweep.error is not None:
            raise sweep.error
        data = {
            "lost_node": victim.node_id,
            "committed_before_restart": sorted(before),
            "summary": sweep.summary.to_json(),
        }
        report.write_text(json.dumps(data))
    finally:
        if paused is not None:
            os.kill(paused, signal.SIGCONT)
        ray.shutdown()
        cluster.shutdown()


def _workers() -> list:
    """The merge workers' actors that are alive (Ray's state API), on different nodes."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "MergeWorker")], detail=True)
    alive = [a for a in actors if a.state == "ALIVE"]
    assert len({a.node_id for a in alive}) == len(alive), alive
    return alive


def _restarted(actor_id: str) -> bool:
    from ray.util.state import get_actor

    actor = get_actor(actor_id)
    return actor is not None and actor.state == "ALIVE" and actor.num_restarts >= 1


def _wait(condition, timeout: float, what: str) -> None:
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except RayStateApiException:  # the state API not answering yet: ask again
            pass
        if time.monotonic() > deadline:
            say(f"FAILED: {what} within {timeout:.0f} s; where the driver is:")
            faulthandler.dump_traceback(sys.stdout)
            sys.exit(1)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
