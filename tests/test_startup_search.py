"""A search with keep top-k runs the same in this process as on Ray: the same trials, scores and
kept merges (the in-process worker feeds the same dispatcher, scheduler and pruning)."""

from __future__ import annotations

from pathlib import Path

from helpers import write_spec
from test_search import _spec, _trials

from raymerge.cluster.driver import run_sweep
from raymerge.store.manifest import committed_merge_ids, merge_dir
from raymerge.sweep.plan import load_plan


def _kept(output: str) -> set[str]:
    """The committed merges that still have their adapter files."""
    return {
        merge_id
        for merge_id in committed_merge_ids(output)
        if (Path(merge_dir(output, merge_id)) / "adapter_model.safetensors").exists()
    }


def test_a_search_with_keep_in_process_matches_ray(demo_dir, ray_cluster, tmp_path):
    runs = {}
    for use_ray in (False, True):
        name = "ray" if use_ray else "local"
        spec = _spec(demo_dir, tmp_path / name, keep={"top": 2})
        spec["search"]["budget"] = 4
        plan = load_plan(write_spec(tmp_path, spec, f"{name}.yaml"))
        summary = run_sweep(plan, use_ray=use_ray)
        assert (summary.done, summary.failed) == (4, 0), summary.failures
        assert summary.executor == ("ray" if use_ray else "in-process")
        trials = [
            {k: line[k] for k in ("trial", "merge_id", "params", "metrics") if k in line}
            for line in _trials(plan.output)
        ]
        runs[name] = {"trials": trials, "kept": _kept(plan.output)}
    assert len(runs["local"]["trials"]) == 4 and len(runs["local"]["kept"]) == 2
    assert runs["local"] == runs["ray"]
