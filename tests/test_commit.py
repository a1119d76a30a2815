"""A merge is committed exactly when its merge.json exists with every file it lists: whatever fails
when (a lost or truncated file, a commit whose answer was lost, a cleanup that fails), resume and
retried tasks check the files, not the marker alone. And the write side holds only what it
writes: a fatal write stops a scoring worker too, uploads go from the tensors' own buffers with
every copy counted in the queue, and queued writes do not hold their inputs."""

from __future__ import annotations

import gc
import hashlib
import itertools
import threading
import time
import tracemalloc
import warnings
import weakref
from pathlib import Path

import pytest
from helpers import many_merges_plan

from raymerge.cluster.driver import run_sweep
from raymerge.cluster.merger import Merger
from raymerge.cluster.worker import MergeWorker
from raymerge.quiet import recorded_warnings
from raymerge.store import commits, manifest, publish, storage

MERGE_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _assert_whole(output: str, merge_id: str, options=None) -> dict:
    """The merge's merge.json exists, and every file it lists has the recorded size and sha256."""
    record = commits.read_record(output, merge_id, options)
    assert record is not None, f"{merge_id} has no merge.json"
    folder = manifest.merge_dir(output, merge_id)
    for name, entry in record["files"].items():
        data = storage.read_bytes(storage.join(folder, name), options)
        assert len(data) == entry["bytes"], (merge_id, name)
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], (merge_id, name)
    return record


def test_a_rerun_makes_again_a_merge_whose_files_were_lost_or_truncated(world, tmp_path):
    """The unlucky operator: after a sweep of 6 merges, one merge's adapter files are deleted
    (merge.json kept) and another's weights truncated to half. The rerun redoes exactly those
    two, and lists all six done, whole."""
    plan = many_merges_plan(world, tmp_path / "out", {}, tmp_path, 6)
    first = run_sweep(plan)
    assert first.done == 6
    ids = [task.merge_id for task in plan.tasks()]
    lost, truncated = (Path(manifest.merge_dir(plan.output, m)) for m in ids[:2])
    for name in MERGE_FILES:
        (lost / name).unlink()
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert commits.committed_merge_ids(plan.output) == set(ids[2:])

    again = run_sweep(plan)
    assert (again.done, again.skipped, again.failed) == (2, 4, 0)
    for merge_id in ids:
        _assert_whole(plan.output, merge_id)
    lines = manifest.read_manifest(plan.output)
    assert sorted(line["merge_id"] for line in lines if line["status"] == "done") == sorted(ids)


def test_a_retried_task_whose_merge_json_lacks_its_files_writes_them(world, tmp_path):
    """A retried task (attempt 1) finds merge.json but not its weights file: it is written again
    rather than reported done."""
    plan = many_merges_plan(world, tmp_path / "out", {}, tmp_path, 1)
    worker = MergeWorker(0, plan.worker_config())
    [task] = plan.tasks()
    assert worker.merge(task).done
    (Path(manifest.merge_dir(plan.output, task.merge_id)) / MERGE_FILES[0]).unlink()
    assert worker.merge(task, attempt=1).done
    _assert_whole(plan.output, task.merge_id)
    worker.close()


@pytest.mark.parametrize("cleanup", ["fails", "works"])
def test_a_commit_whose_answer_is_lost_ends_whole_or_absent(
    world, proxied_output, tmp_path, cleanup
):
    """merge.json's PUT reaches the store but every answer to it is lost, so the commit fails
    for the client; then (`fails`) the cleanup's DELETE of merge.json is refused. The merge ends
    either committed with all its files or not committed, and a rerun of the task completes
    it."""
    proxy, output, options = proxied_output
    plan = many_merges_plan(world, output, options, tmp_path, 1)
    [task] = plan.tasks()
    merger = Merger(plan.worker_config())
    merged = merger.merge(task, merger.inputs(task.adapters))
    folder = manifest.merge_dir(output, task.merge_id)
    files = publish.write_adapter(folder, publish.stage(merged), options)
    record = {"merge_id": task.merge_id, "files": files}
    proxy.fail("PUT", "/merge.json", "lose_reply")
    if cleanup == "fails":
        proxy.fail("DELETE", "/merge.json", "deny", times=1)
    with storage.deadline(3.0), pytest.raises(storage.errors()):
        publish.commit(output, folder, record, options)
    proxy.scripted.clear()
    assert any(r[0] == "PUT" and r[1].endswith("/merge.json") for r in proxy.requests)

    if commits.read_record(output, task.merge_id, options) is not None:
        assert cleanup == "fails"  # the one way merge.json can stay: its DELETE was refused
        _assert_whole(output, task.merge_id, options)
    else:
        assert commits.committed_merge_ids(output, options) == set()
    worker = MergeWorker(0, plan.worker_config())
    result = worker.merge(task, attempt=1)
    worker.close()
    assert result.done, result.error
    _assert_whole(output, task.merge_id, options)
    assert commits.committed_merge_ids(output, options) == {task.merge_id}


def test_an_upload_from_buffers_never_copies_the_file(s3, s3_endpoint):
    """40 MiB of buffers to S3 in 8 MiB parts, 2 at a time: the request bodies are read from
    the buffers in place, so what Python allocates meanwhile stays below one part (about 3 MiB,
    whatever the part size: the HTTP client's own); a joined copy would be 40 MiB, copied parts
    16 MiB."""
    fs, bucket = s3
    options = {"endpoint_url": s3_endpoint}
    buffers = [bytes([i]) * (2**20 + 7) for i in range(40)]
    upload = storage.Upload(part_bytes=8 * 2**20, concurrency=2)
    for name in ("warm-1", "warm-2"):  # the client and its service data, loaded once
        storage.write(f"s3://{bucket}/{name}", buffers, options, upload)
    tracemalloc.start()
    try:
        storage.write(f"s3://{bucket}/big.bin", buffers, options, upload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < upload.part_bytes, peak
    assert fs.cat_file(f"{bucket}/big.bin") == b"".join(buffers)


def test_uploads_follow_the_writes_settings(world, proxied_output, tmp_path):
    """One writer, one part at a time: never two PUTs in flight (a merge's files one after the
    other, under a store slow enough to show any overlap)."""
    proxy, output, options = proxied_output
    writes = {"writers": 1, "upload_concurrency": 1}
    plan = many_merges_plan(world, output, options, tmp_path, 3, writes=writes)
    worker = MergeWorker(0, plan.worker_config())
    proxy.put_delay = 0.2
    results = worker.merge_many(list(plan.tasks()), [0, 0, 0])
    worker.close()
    assert all(result.done for result in results)
    puts = sorted((start, end) for method, _, _, start, end in proxy.requests if method == "PUT")
    assert len(puts) >= 9
    assert all(end <= after for (_, end), (after, _) in itertools.pairwise(puts))


def test_queued_writes_hold_their_staged_bytes_not_their_inputs(world, proxied_output, tmp_path):
    """While a merge waits in the write queue (the store held), the input adapters the cache
    let go are freed (a queued job keeps their provenance only), and the queue counts the
    merge's staged bytes: what it holds."""
    proxy, output, options = proxied_output
    plan = many_merges_plan(world, output, options, tmp_path, 1, adapter_cache_gb=1e-9)
    spec_tasks = list(plan.tasks())
    worker = MergeWorker(0, plan.worker_config())
    inputs: list[weakref.ref] = []
    load = worker.merger.inputs

    def tracked(names):
        adapters = load(names)
        inputs.extend(weakref.ref(adapter) for adapter in adapters)
        return adapters

    worker.merger.inputs = tracked
    proxy.put_delay = 1.0
    call = threading.Thread(target=worker.merge_many, args=(spec_tasks, [0]))
    call.start()
    deadline = time.monotonic() + 60
    while worker.writes.queued_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = worker.writes.queued_bytes
    worker.merger.release(set())  # the cache lets every adapter go, as a later merge's would
    gc.collect()
    alive = [ref() is not None for ref in inputs]
    call.join(60)
    worker.close()
    assert inputs and not any(alive), "a queued write holds its input adapters"
    task = spec_tasks[0]
    staged = publish.stage(Merger(plan.worker_config()).merge(task, load(task.adapters)))
    assert queued == staged.nbytes


def test_a_fatal_write_stops_a_scoring_worker(demo_dir, proxied_output, tmp_path):
    """Once a write is refused (403), the worker's next calls merge and score nothing: each
    merge fails as not written, with no arithmetic or eval stage; a race's round neither."""
    from helpers import demo_merge_spec, write_spec

    from raymerge.sweep.plan import load_plan
    from raymerge.task import Window

    proxy, output, options = proxied_output
    weights = [[0.3, 0.7], [0.5, 0.5], [0.7, 0.3]]
    evaluate = {
        "datasets": {"upper": str(demo_dir / "eval" / "upper.jsonl")},
        "max_samples": 8,
        "objective": "upper.loss",
    }
    spec = demo_merge_spec(
        demo_dir, output, weights, evaluate, ("reverse", "sums"), storage_options=options
    )
    plan = load_plan(write_spec(tmp_path, spec))
    tasks = list(plan.tasks())
    worker = MergeWorker(0, plan.worker_config())
    proxy.deny_puts_after = 0
    [first] = worker.merge_many(tasks[:1], [0])
    assert first.fatal and "AccessDenied" in first.error
    later = worker.merge_many(tasks[1:], [0, 0])
    [window] = worker.score_window(tasks[1:2], Window(0, 0, 4))
    worker.close()
    for result in later:
        assert not result.done and result.fatal and result.error.startswith("not written")
        assert not {"arithmetic", "eval"} & set(result.stages), result.stages
    assert window.error is not None and window.error.startswith("not written")


def test_a_streamed_manifest_read_has_a_deadline(proxied_output, monkeypatch):
    """A store that goes silent in the middle of reading a 16 MiB manifest (four blocks): the
    read fails within its deadline instead of waiting for botocore's read timeout, retries
    after retries."""
    proxy, output, options = proxied_output
    writer = manifest.ManifestWriter(output, options)
    for i in range(160_000):
        writer.add({"merge_id": f"{i:016x}", "status": "done", "note": "x" * 60})
    writer.close(timeout=60)
    monkeypatch.setattr(storage, "CALL_TIMEOUT_SECONDS", 1.0)
    lines = manifest.iter_lines(output, options)
    assert next(lines)["merge_id"] == f"{0:016x}"
    proxy.partition(120)
    started = time.monotonic()
    with storage.deadline(2.0), pytest.raises(storage.errors()):
        list(lines)
    assert time.monotonic() - started < 20  # botocore's read timeout alone is 30 s


def test_warnings_are_recorded_for_the_thread_that_raised_them():
    """A merge records its warnings while a writer thread records its own and a third thread
    records none, all interleaved: each warning lands in the record of the thread that raised
    it, every occurrence, and the third thread's in none."""
    steps = [threading.Event() for _ in range(4)]
    records: dict[str, list] = {}

    def merging() -> None:
        with recorded_warnings() as caught:
            steps[0].set()
            steps[1].wait(10)  # the writer records too now
            warnings.warn("merge caveat", UserWarning, stacklevel=1)
            steps[2].set()
            steps[3].wait(10)  # the third thread has warned meanwhile
        records["merging"] = caught

    def writing() -> None:
        steps[0].wait(10)
        with recorded_warnings() as caught:
            steps[1].set()
            steps[2].wait(10)
            warnings.warn("write caveat", UserWarning, stacklevel=1)
            warnings.warn("write caveat", UserWarning, stacklevel=1)
        records["writing"] = caught

    def other() -> None:
        steps[2].wait(10)
        warnings.warn("unrelated", UserWarning, stacklevel=1)
        steps[3].set()

    threads = [threading.Thread(target=f) for f in (merging, writing, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [str(w.message) for w in records["merging"]] == ["merge caveat"]
    assert [str(w.message) for w in records["writing"]] == ["write caveat", "write caveat"]


def test_warnings_recording_survives_catch_warnings_in_another_thread():
    """A thread's `catch_warnings` block that begins while a merge records and ends after it
    restores the recording hook: later recordings still record, and a thread that does not
    record still gets its warnings shown as before (no recursion into the hook)."""
    entered, left = threading.Event(), threading.Event()
    shown = []

    def other() -> None:
        with warnings.catch_warnings():
            entered.set()
            left.wait(10)

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        thread = threading.Thread(target=other)
        with recorded_warnings():
            thread.start()
            entered.wait(10)
        left.set()
        thread.join(10)
        with recorded_warnings() as caught:
            warnings.warn("recorded", UserWarning, stacklevel=1)
            outside = threading.Thread(target=warnings.warn, args=("shown", UserWarning))
            outside.start()
            outside.join(10)
    assert [str(w.message) for w in caught] == ["recorded"]
    assert shown == ["shown"]
