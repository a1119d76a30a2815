"""`raymerge materialize`: rebuild recorded merges from their merge.json (the recipe: inputs and
their digests, weights, type, parameters, seed, dtype) and write them in PEFT's format.

The rebuilt files are checked against the digests the record holds: the fast engine's output is
byte-for-byte reproducible with the same inputs on the same device type and thread count (DARE masks
are the same on every device, but floating-point rounding differs between CPU and CUDA, and an SVD's
last bits may differ with the number of threads). Inputs that changed since are refused; files that
do not match the record are never written into the sweep's output.

Usage::

    raymerge materialize s3://bucket/sweeps/run-1 5d1c0a9be2f4417e --to ./best
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raymerge.cluster.merger import Merger
from raymerge.errors import InputError, MergeError
from raymerge.store import commits, manifest, publish, storage
from raymerge.task import MergeTask, WorkerConfig


@dataclass(frozen=True)
class Materialized:
    merge_id: str
    path: str
    matches_record: bool
    note: str = ""


def read_record(output: str, merge_id: str, storage_options=None) -> dict[str, Any]:
    try:
        record = commits.read_record(output, merge_id, storage_options)
    except ValueError as exc:  # not 16 hex digits
        raise InputError(f"{merge_id!r}: {exc}") from None
    if record is None:
        raise InputError(f"merge {merge_id} is not recorded in {output} (no merge.json)")
    return record


def task_of(record: dict[str, Any]) -> MergeTask:
    return MergeTask(
        merge_id=record["merge_id"],
        adapters=tuple(a["name"] for a in record["adapters"]),
        weights=tuple(record["weights"]),
        combination_type=record["combination_type"],
        params=record["params"],
        seed=record["seed"],
        merge_seed=record["merge_seed"],
        output_dtype=record["output_dtype"],
    )


def worker_config(record: dict[str, Any], storage_options=None) -> WorkerConfig:
    """A worker like the one that made the merge: on CUDA only if the record says it ran on CUDA
    (and this machine has it: the base model decides), else on the CPU."""
    ran_on = str(record.get("worker", {}).get("device", "cpu")).split(":")[0]
    return WorkerConfig(
        base_model=record["base_model"],
        adapter_uris={a["name"]: a["uri"] for a in record["adapters"]},
        output="",
        storage_options=dict(storage_options or {}),
        task_type=record.get("task_type"),
        num_threads=record.get("worker", {}).get("threads", 1),
        gpus=1 if ran_on == "cuda" else 0,
        engine=record["engine"] if record["engine"] in ("fast", "peft") else "fast",
    )


def materialize(
    output: str, merge_ids: list[str], to: str | None = None, storage_options=None
) -> list[Materialized]:
    """Rebuild each merge (in this process) and write it to `to/<merge_id>/`, or back into the
    sweep's own merge folder when `to` is None (where keep top-k dropped its files)."""
    import torch

    records = [read_record(output, m, storage_options) for m in dict.fromkeys(merge_ids)]
    results = []
    mergers: dict[str, Merger] = {}
    threads = torch.get_num_threads()
    try:
        for record in records:
            config = worker_config(record, storage_options)
            key = json.dumps([config.base_model, config.engine,
                              sorted(config.adapter_uris.items())])  # fmt: skip
            if key not in mergers:
                mergers[key] = Merger(config)
            # An SVD's last bits may depend on the thread count: rebuild with the recorded one.
            torch.set_num_threads(max(1, config.num_threads))
            results.append(_rebuild(mergers[key], record, output, to, storage_options))
    finally:
        torch.set_num_threads(threads)
    return results


def materialize_on(
    address: str | None, output: str, merge_ids: list[str], to: str | None = None
) -> list[Materialized]:
    """`materialize` on the Ray cluster at `address` (one CPU there, where the inputs and the
    output are reachable), else in this process."""
    if not address:
        return materialize(output, merge_ids, to)
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        rebuild = ray.remote(materialize).options(num_cpus=1)
        return list(ray.get(rebuild.remote(output, merge_ids, to)))
    finally:
        ray.shutdown()


def _rebuild(merger: Merger, record, output: str, to: str | None, storage_options) -> Materialized:
    task = task_of(record)
    inputs = merger.inputs(task.adapters)
    for adapter, recorded in zip(inputs, record["adapters"], strict=True):
        if adapter.provenance["weights_sha256"] != recorded.get("weights_sha256"):
            raise InputError(
                f"adapter {adapter.name!r} ({recorded['uri']}) changed since merge "
                f"{task.merge_id} was made (its weights' sha256 differs): it cannot be rebuilt "
                "from these inputs"
            )
    files = publish.serialise(merger.merge(task, inputs))
    recorded = {name: f["sha256"] for name, f in record["files"].items()}
    matches = publish.digests(files) == recorded
    note = ""
    here = str(merger.base.device.type)
    there = str(record.get("worker", {}).get("device", here)).split(":")[0]
    if not matches and here != there:
        note = (
            f"recorded on {there}, rebuilt on {here}: floating-point rounding differs between "
            "device types"
        )
    if to is None:
        if not matches:
            raise MergeError(
                f"merge {task.merge_id}: the rebuilt files differ from the record"
                + (f" ({note})" if note else "")
                + "; not written into the sweep's output (use --to to write them elsewhere)"
            )
        folder = manifest.merge_dir(output, task.merge_id)
    else:
        folder = storage.join(to, task.merge_id)
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data, storage_options)
    if to is None:  # its files are back: its merge.json says so again
        commits.set_kept(output, task.merge_id, True, storage_options)
    return Materialized(task.merge_id, folder, matches, note)
