"""The scenario of test_node_loss.py's cluster test, in a process of its own (the test process may
hold the session's Ray instance): a simulated cluster (`ray.cluster_utils.Cluster`: a head with
no CPUs and two nodes of 1 CPU and 1 logical GPU, each a raylet on this machine), a sweep of two
workers, one per node; once merges are committed, one worker's node is killed (SIGKILL, no drain)
and a new node added. Ray restarts that worker there; the run must take it up again. (Both
workers are paused meanwhile, the other until the restarted one has committed merges: neither
can finish the sweep alone first, whatever the machine's speed.)

    python tests/node_loss_run.py SPEC REPORT   # REPORT: JSON with the summary; exit 1 if not
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
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
    import psutil
    import ray
    from helpers import SweepThread, wait_for_commits
    from ray.cluster_utils import Cluster

    from raymerge.sweep.plan import load_plan

    plan = load_plan(spec_path)
    # No dashboard: nothing here needs it, and it is one more process to start on 2 cores.
    head = {"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    lost, kept = (cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2))
    paused = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        sweep = SweepThread(plan)

        def committed() -> set[str]:
            return {p.parent.name for p in Path(plan.output).glob("merges/*/merge.json")}

        wait_for_commits(lambda: len(committed()), 6, sweep.running, timeout=150)
        victim, survivor = _merge_worker(lost), _merge_worker(kept)  # both up: merges started
        # Both frozen first: neither can finish the sweep before the node is gone. The survivor
        # stays paused until the restarted worker has committed merges: every merge committed
        # meanwhile is the restarted worker's.
        survivor.send_signal(signal.SIGSTOP)
        paused = survivor
        victim.send_signal(signal.SIGSTOP)
        say(f"{len(committed())} merges committed; both workers paused; removing a node")
        cluster.remove_node(lost, allow_graceful=False)  # its raylet and the rest: SIGKILL
        with contextlib.suppress(psutil.NoSuchProcess):  # as its machine's processes die
            victim.send_signal(signal.SIGKILL)
        _wait(lambda: _gone(victim), 60, "the lost node's merge worker did not die")
        before = committed()
        cluster.add_node(num_cpus=1, num_gpus=1)
        say(f"node removed, another added; {len(before)} merges committed")
        _wait(lambda: len(committed()) >= len(before) + 3, 120, "the restarted worker got no work")
        say(f"{len(committed()) - len(before)} merges committed since; the survivor resumed")
        survivor.send_signal(signal.SIGCONT)
        paused = None
        sweep.join(180)
        say("sweep done")
        if sweep.error is not None:
            raise sweep.error
        data = {
            "lost_node": lost.node_id,
            "committed_before_restart": sorted(before),
            "summary": sweep.summary.to_json(),
        }
        report.write_text(json.dumps(data))
    finally:
        if paused is not None:
            paused.send_signal(signal.SIGCONT)
        ray.shutdown()
        cluster.shutdown()


def _merge_worker(node):
    """The merge worker's process on `node` (a child of its raylet)."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    [worker] = [
        p for p in raylet.children(recursive=True) if p.name().startswith("ray::MergeWorker")
    ]
    return worker


def _gone(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            say(f"FAILED: {what} within {timeout:.0f} s; where the driver is:")
            faulthandler.dump_traceback(sys.stdout)
            sys.exit(1)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
