"""The pipelined write side: a worker merges while its writer threads serialise, hash, write and
commit earlier merges. The written bytes are safetensors' own; each merge's files are written
before its merge.json, under a slow store and when the store turns unwritable mid-queue; the
queue's memory stays bounded when the store is slower than the merges."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import base_spec, many_merges_plan, methods_for, write_spec

from raymerge.cluster.merger import Merger
from raymerge.cluster.pipeline import CommitQueue
from raymerge.cluster.worker import MergeWorker
from raymerge.merge.format import weights_bytes, weights_parts
from raymerge.merge.output import MergedOutput
from raymerge.merge.registry import METHODS
from raymerge.store import commits, manifest, publish, storage
from raymerge.sweep.plan import load_plan


def test_the_weights_file_laid_out_is_byte_for_byte_safetensors():
    """Header and buffers, concatenated, are what safetensors.torch.save writes: any dtype mix,
    odd sizes, empty and scalar tensors, names that sort differently by dtype and by name."""
    rng = random.Random(7)
    generator = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    for _ in range(200):
        tensors = {}
        for _ in range(rng.randint(0, 7)):
            name = "".join(rng.choice("abAB._09z") for _ in range(rng.randint(1, 10)))
            shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
            tensors[name] = torch.randn(shape, generator=generator).to(rng.choice(dtypes))
        parts = weights_parts(tensors)
        assert len(parts) == len(tensors) + 1  # laid out, never the fallback
        assert b"".join(bytes(part) for part in parts) == weights_bytes(tensors)


def test_a_merged_output_is_the_file_safetensors_writes():
    """The fast engine's one buffer, filled chunk by chunk (evenly spaced keys in one strided
    copy, the rest key by key) with -0.0 turned into 0.0 and cast to the output dtype, is with
    its header byte for byte what safetensors writes for the same tensors."""
    rng = random.Random(11)
    generator = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for _ in range(40):
            names = {"".join(rng.choice("abAB._09z") for _ in range(rng.randint(1, 8)))
                     for _ in range(rng.randint(1, 9))}  # fmt: skip
            shapes = {name: (rng.randint(0, 3), rng.randint(1, 4)) for name in names}
            expected = {}
            for name, shape in shapes.items():
                values = torch.randn(shape, generator=generator)
                expected[name] = torch.where(values.abs() < 0.3, -0.0, values)
            output = MergedOutput(shapes, dtype, "cpu")
            keys = sorted(shapes, key=output.position)
            while keys:
                chunk = [k for k in keys if shapes[k] == shapes[keys[0]]][: rng.randint(1, 4)]
                output.put(chunk, torch.stack([expected[k] for k in chunk]))
                keys = [k for k in keys if k not in chunk]
            output.check("merge x")
            written = output.file.layout.header + bytes(output.file.data.numpy())
            saved = {name: (value + 0.0).to(dtype) for name, value in expected.items()}
            assert written == weights_bytes(saved)
            assert all(torch.equal(output.tensors[k], saved[k]) for k in saved)


def test_local_writes_hash_each_block_as_they_write_it(tmp_path):
    """On a local disk the digests come from the blocks as they are written: several blocks,
    several buffers, an empty one, bytes; the record's digests are the files' own."""
    import hashlib
    import os

    weights = [os.urandom(2 * storage.WRITE_BLOCK_BYTES + 5), memoryview(os.urandom(100)), b""]
    stages: dict[str, float] = {}
    folder = tmp_path / "merge"
    files = publish.write_files(str(folder), {"w.bin": weights, "c.json": b"{}"}, stages=stages)
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert files["w.bin"]["bytes"] == 2 * storage.WRITE_BLOCK_BYTES + 105
    assert stages["hash"] > 0 and stages["write"] > 0


def test_a_dtype_it_does_not_lay_out_falls_back_to_safetensors():
    tensors = {"w": torch.arange(6, dtype=torch.int32).reshape(2, 3), "v": torch.ones(2)}
    assert weights_parts(tensors) == [weights_bytes(tensors)]


def test_every_type_writes_the_bytes_safetensors_writes(world, tmp_path):
    """Through the pipelined worker, every registry type's files equal the merge's tensors
    saved by safetensors (and its config as PEFT writes it), merge by merge."""
    spec = base_spec(
        world,
        tmp_path / "out",
        combinations=[
            {
                "adapters": ["a", "b"],
                "weights": [[0.7, -0.4]],
                "methods": methods_for(sorted(METHODS), density=0.5),
            }
        ],
    )
    plan = load_plan(write_spec(tmp_path, spec))
    tasks = list(plan.tasks())
    assert {task.combination_type for task in tasks} == set(METHODS)
    worker = MergeWorker(0, plan.worker_config())
    results = worker.merge_many(tasks, [0] * len(tasks))
    assert all(result.done for result in results), [r.error for r in results if not r.done]
    merger = Merger(plan.worker_config())
    for task in tasks:
        expected = publish.serialise(merger.merge(task, merger.inputs(task.adapters)))
        folder = Path(manifest.merge_dir(plan.output, task.merge_id))
        for name, data in expected.items():
            assert (folder / name).read_bytes() == data, (task.combination_type, name)


def test_the_queue_applies_back_pressure_and_stops_on_a_fatal_write():
    """A writer held on an event: submits beyond the byte budget wait until a write finishes;
    a fatal result skips everything still queued, with the reason."""
    release = threading.Event()
    queue = CommitQueue(budget_bytes=250, writers=1, fatal=lambda r: r == "fatal" and "disk full")

    def write(result):
        def run():
            release.wait(timeout=30)
            return result

        return run

    futures = [queue.submit(100, write("ok"), skipped=lambda why: f"skipped: {why}")]
    futures.append(queue.submit(100, write("fatal"), skipped=lambda why: f"skipped: {why}"))
    blocked = threading.Thread(
        target=lambda: futures.append(queue.submit(100, write("ok"), lambda why: f"no: {why}"))
    )
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()  # 300 bytes would exceed the 250-byte budget: it waits
    assert queue.queued_bytes == 200
    release.set()
    blocked.join(timeout=30)
    assert not blocked.is_alive()
    assert [f.result(timeout=30) for f in futures] == ["ok", "fatal", "no: disk full"]
    assert queue.peak_bytes <= 250 and queue.stopped == "disk full"
    queue.close()


def test_one_merge_larger_than_the_budget_still_goes_through():
    queue = CommitQueue(budget_bytes=10, writers=1, fatal=lambda r: None)
    futures = [queue.submit(1000, lambda: "done", lambda why: why) for _ in range(3)]
    assert [f.result(timeout=30) for f in futures] == ["done"] * 3
    assert queue.peak_bytes == 1000  # one at a time, never two
    queue.close()


def _order_of_puts(proxy, output: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Per merge folder: each file's PUT (start, end), as the store saw them."""
    prefix = "/" + output.removeprefix("s3://") + "/merges/"
    folders: dict[str, dict[str, tuple[float, float]]] = {}
    for method, path, _, start, end in proxy.requests:
        if method == "PUT" and path.startswith(prefix):
            merge_id, _, name = path[len(prefix) :].partition("/")
            assert name not in folders.setdefault(merge_id, {}), f"{path} written twice"
            folders[merge_id][name] = (start, end)
    return folders


def test_a_slow_store_keeps_the_commit_order_and_bounds_the_queue(world, proxied_output, tmp_path):
    """Every PUT takes 0.15 s, far longer than a merge: the worker's queue never holds more than
    its budget (two merges' worth) beyond one merge, and every merge.json is written after
    both of its files finished, exactly once."""
    proxy, output, options = proxied_output
    plan = many_merges_plan(world, output, options, tmp_path, 8)
    config = plan.worker_config()
    worker = MergeWorker(0, config)
    tasks = list(plan.tasks())
    one = publish.stage(worker.merger.merge(tasks[0], worker.merger.inputs(["a", "b"]))).nbytes
    worker.writes.budget_bytes = 2 * one
    proxy.put_delay = 0.15
    results = worker.merge_many(tasks, [0] * len(tasks))
    assert all(result.done for result in results), [r.error for r in results]
    assert worker.writes.peak_bytes <= 2 * one  # merging waited for the writes
    folders = _order_of_puts(proxy, output)
    assert set(folders) == {task.merge_id for task in tasks}
    for files in folders.values():
        assert set(files) == {"adapter_model.safetensors", "adapter_config.json", "merge.json"}
        committed = files["merge.json"][0]
        assert all(end <= committed for name, (_, end) in files.items() if name != "merge.json")
    assert {r.merge_id for r in results} == set(commits.committed_merge_ids(output, options))


def test_a_store_that_turns_unwritable_mid_queue_lists_only_what_it_committed(
    world, proxied_output, tmp_path
):
    """After a few PUTs the store answers 403 to every write: the merges in the queue are not
    written, the worker makes no more, each result is committed or failed as fatal, and no
    merge has files without its merge.json."""
    proxy, output, options = proxied_output
    # One writer: the merges are written one after the other, so the 7 PUTs let through are
    # exactly two merges' three files and one file of the third.
    plan = many_merges_plan(world, output, options, tmp_path, 10, writes={"writers": 1})
    worker = MergeWorker(0, plan.worker_config())
    tasks = list(plan.tasks())
    puts_so_far = sum(1 for request in proxy.requests if request[0] == "PUT")
    proxy.deny_puts_after = puts_so_far + 7  # two merges, and one file of the third
    results = worker.merge_many(tasks, [0] * len(tasks))
    done = {r.merge_id for r in results if r.done}
    failed = [r for r in results if not r.done]
    assert len(done) == 2 and len(failed) == 8
    assert all(r.fatal for r in failed) and any("AccessDenied" in r.error for r in failed)
    assert sum(r.error.startswith("not written") for r in failed) >= 1
    assert worker.writes.stopped is not None
    assert set(commits.committed_merge_ids(output, options)) == done
    fs, path = storage.filesystem(output, options)
    proxy.deny_puts_after = None
    left = {p.split("/merges/")[1].split("/")[0] for p in fs.find(f"{path}/merges")}
    assert left == done  # the failed merge's one file was removed
    for files in _order_of_puts(proxy, output).values():
        assert list(files).count("merge.json") <= 1


def test_a_large_file_goes_to_s3_in_concurrent_parts(s3, s3_endpoint):
    """12 MiB of buffers with 5 MiB parts: a multipart upload of three parts, read back whole."""
    from flaky_s3 import FlakyS3Proxy

    fs, bucket = s3
    data = [bytes(range(256)) * (4096 * 4), b"tail" * 1000, bytes(7 * 2**20)]
    with FlakyS3Proxy(s3_endpoint) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        proxy.put_delay = 0.5  # one after the other, the starts would be 0.5 s apart
        upload = storage.Upload(part_bytes=5 * 2**20, concurrency=3)
        storage.write(f"s3://{bucket}/big.bin", data, options, upload)
        parts = [r for r in proxy.requests if r[0] == "PUT" and "partNumber=" in r[2]]
    assert len(parts) == 3
    starts, ends = [p[3] for p in parts], [p[4] for p in parts]
    assert max(starts) < min(ends)  # all three in flight at once
    assert fs.cat_file(f"{bucket}/big.bin") == b"".join(data)


DELAY = 0.4
"""Seconds one stage is made slower by: far above what any stage of these tiny merges takes."""


def _slowed(function, when=lambda *args, **kwargs: True):
    def slow(*args, **kwargs):
        if when(*args, **kwargs):
            time.sleep(DELAY)
        return function(*args, **kwargs)

    return slow


def _adapter_file(uri, *args, **kwargs) -> bool:
    return not uri.endswith(manifest.MERGE_JSON)  # merge.json's write is the commit's


SLOWED = {
    "load": lambda worker: (worker.merger, "inputs", _slowed(worker.merger.inputs)),
    "arithmetic": lambda worker: (worker.merger, "merge", _slowed(worker.merger.merge)),
    "serialise": lambda worker: (publish, "config_bytes", _slowed(publish.config_bytes)),
    "copy_to_host": lambda worker: (
        publish.StagedAdapter,
        "files",
        _slowed(publish.StagedAdapter.files),
    ),
    "hash": lambda worker: (publish, "_update", _slowed(publish._update)),
    "write": lambda worker: (storage, "write", _slowed(storage.write, _adapter_file)),
    "commit": lambda worker: (manifest, "commit_merge", _slowed(manifest.commit_merge)),
}
"""Each stage a merge's result times, and how to make that stage, and only it, DELAY slower."""


@pytest.mark.parametrize("slow", sorted(SLOWED))
def test_stage_timings_reach_the_result(world, tmp_path, monkeypatch, slow):
    """One stage made DELAY slower (per call: the hash and the write run once per file) shows up
    in that stage of every result, and in no other; the record's total (merge.json's seconds,
    written during the commit: it counts the stages before) and the result's total carry it."""
    plan = many_merges_plan(world, tmp_path / "out", {}, tmp_path, 2)
    worker = MergeWorker(0, plan.worker_config())
    monkeypatch.setattr(*SLOWED[slow](worker))
    started = time.perf_counter()
    results = worker.merge_many(list(plan.tasks()), [0, 0])
    elapsed = time.perf_counter() - started
    for result in results:
        assert result.done, result.error
        assert set(result.stages) == set(SLOWED)
        assert result.stages[slow] >= DELAY, result.stages
        others = {name: seconds for name, seconds in result.stages.items() if name != slow}
        assert max(others.values()) < DELAY, result.stages
        assert result.seconds >= DELAY
        assert result.record["seconds"] <= elapsed
        if slow != "commit":
            assert result.record["seconds"] >= DELAY
