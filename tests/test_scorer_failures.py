"""Scoring failures, named: an out-of-memory says so and what to change, in a merge's error (its
pass failed) and as the one line a run ends with when the references cannot be scored. Real
workers, real PEFT, real Ray; the allocation failure is raised where a forward pass would raise
it, from a forward hook on the model's lm_head."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import base_spec, write_spec

from raymerge.cluster.driver import _score_references
from raymerge.cluster.executor import RayWorkers
from raymerge.cluster.worker import MergeWorker
from raymerge.errors import ClusterError, InputError, is_out_of_memory
from raymerge.store.manifest import read_references
from raymerge.sweep.plan import load_plan

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 7.83 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    "which 1.02 GiB is free."
)
KNOBS = ("evaluate.adapters_per_pass", "evaluate.batch_size", "gpu_headroom_gb")


def _host_allocation_failure() -> RuntimeError:
    """What the CPU allocator raises for an allocation it cannot make (2**62 bytes)."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("2**62 bytes were allocated")


def test_out_of_memory_is_told_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    assert is_out_of_memory(RuntimeError(f"HIP error: {CUDA_OOM.lower()}"))
    assert is_out_of_memory(_host_allocation_failure())
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("a spec value says out of memory"))


def _plan(world, tmp_path, name="sweep.yaml"):
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"{i} apples and {i + 1} pears"}) + "\n" for i in range(8))
    )
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["weights"] = [[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]]
    spec["evaluate"] = {
        "datasets": {"text": str(text)},
        "batch_size": 4,
        "max_length": 16,
        "adapters_per_pass": 3,
    }
    return load_plan(write_spec(tmp_path, spec, name))


def _raise_from_lm_head(worker: MergeWorker, error: BaseException):
    """Every forward pass of the worker's model raises `error` (the hook's handle)."""

    def hook(module, args):
        raise error

    return worker.base.model.get_output_embeddings().register_forward_pre_hook(hook)


def test_a_pass_that_runs_out_of_memory_fails_its_merges_saying_what_to_change(world, tmp_path):
    plan = _plan(world, tmp_path)
    tasks = list(plan.tasks())
    worker = MergeWorker(0, plan.worker_config())
    handle = _raise_from_lm_head(worker, torch.OutOfMemoryError(CUDA_OOM))
    failed = worker.merge_many(tasks, [0] * len(tasks))
    assert [r.status.value for r in failed] == ["failed"] * 3
    for result in failed:
        error = result.error
        assert "\n" not in error and "Traceback" not in error, error
        assert error.startswith("scoring the pass of 3 merge(s) this one was scored in ran out of")
        assert CUDA_OOM.split(".")[0] in error and all(knob in error for knob in KNOBS), error
        assert (
            "evaluate.adapters_per_pass 3 x evaluate.batch_size 4 x (evaluate.max_length" in error
        )
    handle.remove()  # the worker is usable again: the same merges now score and commit
    assert all(r.done for r in worker.merge_many(tasks, [0] * len(tasks)))


def test_a_failure_scoring_the_references_ends_the_run_with_one_line(world, ray_cluster, tmp_path):
    """On a real Ray actor (a MergeWorker, as the driver starts it): an unreadable eval set is
    the input error it is, an out-of-memory names the knobs, any other error its type and
    message; never a remote traceback, and no references.json is written."""
    import ray

    plan = _plan(world, tmp_path)

    class Worker(MergeWorker):  # pickled by value: only names Ray's worker can import
        def fail_with(self, error: BaseException) -> None:
            """Every forward pass from now on raises `error` (from lm_head's pre-hook)."""

            def hook(module, args):
                raise error

            if getattr(self, "hook", None) is not None:
                self.hook.remove()
            self.hook = self.base.model.get_output_embeddings().register_forward_pre_hook(hook)

    actor = ray.remote(Worker).options(num_cpus=1, num_gpus=0).remote(0, plan.worker_config())
    eval_set = tmp_path / "text.jsonl"
    saved = eval_set.read_text()
    eval_set.unlink()  # after planning: the worker finds it gone
    with pytest.raises(InputError) as unreadable:
        _score_references(plan, RayWorkers({0: actor}))
    eval_set.write_text(saved)
    ray.get(actor.fail_with.remote(torch.OutOfMemoryError(CUDA_OOM)))
    with pytest.raises(ClusterError) as oom:
        _score_references(plan, RayWorkers({0: actor}))
    ray.get(actor.fail_with.remote(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED\nat line 3")))
    with pytest.raises(ClusterError) as other:
        _score_references(plan, RayWorkers({0: actor}))
    ray.kill(actor)
    for raised in (unreadable, oom, other):
        assert "\n" not in str(raised.value) and "Traceback" not in str(raised.value)
        assert str(raised.value).startswith("scoring the references (the base model and input ")
    assert "evaluate.datasets.text" in str(unreadable.value)
    assert "ran out of memory" in str(oom.value) and all(k in str(oom.value) for k in KNOBS)
    assert "failed: RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED; " in str(other.value)
    assert read_references(plan.output) is None
