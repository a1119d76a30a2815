"""The prepared GPU check: one command that runs the GPU path in this process (the worker's merge
side, the engines, the scorer, the publisher; no Ray) and prints one table.

    python -m raymerge.bench.gpu_check --device cuda --out /tmp/gpu-check

Three parts, sized to finish in well under 8 minutes on one H200:

1. **types**: every combination type of the registry, on the fast engine and (PEFT's types) on
   PEFT's path, merged on `--device` and on the CPU from the same inputs: the largest relative
   error of each merged delta (B @ A) against the CPU's, and whether two runs on the device give
   the same bytes (DARE included: its masks come from the CPU stream whatever the device).
   The world has the real model's layout (SmolLM2-135M-Instruct's config: hidden 576, 30
   layers, 9 query and 3 key/value heads, so k and v are 192 wide) with generated weights.
2. **scoring**: a scored sweep on a Llama of that layout and vocabulary (49,152), weights
   generated, with `adapters_per_pass` 1, 4 and 16: merges/s and the device's peak memory.
3. **merge bench**: the `smollm2-135m` and `llama-8b` shapes (config-only bases, bf16 adapters
   of r=16 on every linear layer; ~84 MB at 8B) merged on the device: merges/s per type, peak
   memory, the share of each merge's time in arithmetic, copy to host, serialisation and
   writing, and what one merge asks of the host (counted with torch's profiler): kernel
   launches and copies queued, host synchronisations, and value reads into Python.

`--device cpu --small` runs the same code on tiny sizes (the tests do, so the check cannot rot).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raymerge.merge.registry import METHODS
from raymerge.task import EvalConfig, MergeTask, WorkerConfig

TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-4
"""Scored K per pass against one at a time: equal on the CPU; kernels of other batch shapes may
round differently on a GPU."""
SCORING_PASSES = (1, 4, 16)
BENCH_TYPES = ("linear", "cat", "ties", "dare_linear", "svd", "core_ta")
SIZES = {
    # The worlds of the types and of scoring (build_world's arguments), the merge bench's shapes.
    # Full: the real model's layout (SmolLM2-135M: hidden 576, 30 layers, 9/3 heads, vocabulary
    # 49,152) with weights generated here, since its file is too large to carry to a GPU host.
    "full": {
        "types": {"shape": "smollm2-135m"},
        "scoring": {"shape": "smollm2-135m"},
        "scoring_merges": 32,
        "bench": ("smollm2-135m", "llama-8b"),
        "bench_pairs": 6,
    },
    "small": {
        "types": {"hidden_size": 64, "layers": 2},
        "scoring": {"hidden_size": 64, "layers": 2},
        "scoring_merges": 20,
        "bench": ("small",),
        "bench_pairs": 3,
    },
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    """The device's peak allocated memory since the last reset (the process's peak RSS on CPU)."""
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _params(name: str, rank: int) -> dict[str, Any]:
    method = METHODS[name]
    params = dict(method.defaults())
    if "density" in method.required() or "density" in params:
        params["density"] = 0.5
    if "svd_rank" in method.required() or "svd_rank" in params:
        params["svd_rank"] = rank
    return params


def _task(names: tuple[str, ...], weights, combination_type: str, rank: int, n: int) -> MergeTask:
    merge_id = f"{n:016x}"
    params = _params(combination_type, rank)
    return MergeTask(merge_id, names, tuple(weights), combination_type, params, 0, 7 + n, "float32")


def _config(world, device: str, output: str, **extra) -> WorkerConfig:
    return WorkerConfig(
        base_model=str(world.base_model),
        adapter_uris={name: str(path) for name, path in world.adapters.items()},
        output=output,
        gpus=1 if device.startswith("cuda") else 0,
        **extra,
    )


def _deltas(merged) -> dict[str, torch.Tensor]:
    """Module -> B @ A in float64 on the CPU (an SVD's factors are unique only up to signs)."""
    from raymerge.merge.format import parse_lora_key

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in merged.tensors.items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            parts.setdefault(parsed[0], {})[parsed[1]] = tensor.detach().double().cpu()
    return {m: p["lora_B"] @ p["lora_A"] for m, p in parts.items() if "lora_A" in p}


def _relative_error(actual: dict, expected: dict) -> float:
    worst = 0.0
    for module, reference in expected.items():
        scale = max(float(reference.abs().max()), 1e-30)
        worst = max(worst, float((actual[module] - reference).abs().max()) / scale)
    return worst


def check_types(root: Path, device: str, size: str, log: Callable[[str], None]) -> list[dict]:
    """Every type on `device` against the CPU, and on `device` twice (byte for byte)."""
    from raymerge.cluster.merger import Merger
    from raymerge.demo.world import AdapterShape, build_world
    from raymerge.store.publish import serialise, stage

    shape = AdapterShape(r=8, lora_alpha=16)
    world = build_world(root / "types", {"a": shape, "b": shape}, **SIZES[size]["types"])
    rows = []
    for engine in ("fast", "peft"):
        here = Merger(_config(world, device, "", engine=engine))
        cpu = Merger(_config(world, "cpu", "", engine=engine))
        for n, name in enumerate(sorted(METHODS)):
            if engine == "peft" and not METHODS[name].peft:
                continue
            log(f"types: {name} on {engine}")
            task = _task(("a", "b"), (0.7, 0.4), name, 8, n)
            first = here.merge(task, here.inputs(task.adapters))
            again = here.merge(task, here.inputs(task.adapters))
            on_cpu = cpu.merge(task, cpu.inputs(task.adapters))
            staged = {name: b"".join(bytes(b) for b in buffers)
                      for name, buffers in stage(first).files().items()}  # fmt: skip
            error = _relative_error(_deltas(first), _deltas(on_cpu))
            rows.append(
                {
                    "engine": first.ran.engine,
                    "type": name,
                    "device": first.ran.device,
                    "compute_dtype": first.ran.compute_dtype,
                    "rel_error_vs_cpu": f"{error:.1e}",
                    "ok": error <= TOLERANCE,
                    "repeatable": serialise(first) == serialise(again),
                    "host_copy_exact": staged == serialise(first),
                }
            )
    return rows


def _eval_set(folder: Path, examples: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "text.jsonl"
    lines = [json.dumps({"text": f"{i} + {i % 7} = {i + i % 7}. " * 6}) for i in range(examples)]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_scoring(root: Path, device: str, size: str, log: Callable[[str], None]) -> list[dict]:
    """A scored sweep of `merges` merges with 1, 4 and 16 merges per forward pass."""
    from raymerge.cluster.worker import MergeWorker
    from raymerge.demo.world import AdapterShape, build_world

    merges = SIZES[size]["scoring_merges"]
    shape = AdapterShape(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"))
    log(f"scoring: building a Llama of {SIZES[size]['scoring']}")
    names = ("a", "b", "c")
    world = build_world(root / "scoring", dict.fromkeys(names, shape), **SIZES[size]["scoring"])
    datasets = {"text": {"uri": str(_eval_set(root / "eval")), "kind": "text"}}
    pairs = list(itertools.combinations(names, 2))
    measured = [
        _task(pairs[n % len(pairs)], (0.5, 0.2 + n / 100), "linear", 16, n) for n in range(merges)
    ]
    rows, first_losses = [], None
    for per_pass in SCORING_PASSES:
        output = root / f"scored-{per_pass}"
        evaluate = EvalConfig(datasets, max_samples=64, batch_size=8, max_length=128,
                              adapters_per_pass=per_pass, objective=["text.loss"])  # fmt: skip
        worker = MergeWorker(0, _config(world, device, str(output), evaluate=evaluate))
        warm_up = [_task(pairs[0], (0.3, 0.3 + n / 100), "linear", 16, 1000 + n)
                   for n in range(per_pass)]  # fmt: skip
        worker.merge_many(warm_up, [0] * per_pass)  # slots made, kernels loaded
        _sync(device)
        _reset_peak(device)
        started = time.perf_counter()
        results = worker.merge_many(measured, [0] * merges)
        _sync(device)
        seconds = time.perf_counter() - started
        losses = [r.record["metrics"]["text"]["loss"] if r.done else math.nan for r in results]
        first_losses = first_losses or losses
        rows.append(
            {
                "adapters_per_pass": per_pass,
                "merges": len(results),
                "failed": sum(not r.done for r in results),
                "merges_per_s": round(len(results) / seconds, 2),
                "peak_mb": _peak_mb(device),
                "max_loss_diff_vs_1": _largest_difference(losses, first_losses),
            }
        )
        shutil.rmtree(output, ignore_errors=True)
    return rows


def _largest_difference(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(losses, reference, strict=True))


def _bench_world(root: Path, shape: str):
    from raymerge.demo.world import AdapterShape, build_config_only_world, build_world

    names = [f"adapter{i}" for i in range(4)]
    if shape != "small":
        return build_config_only_world(root / "bench" / shape, shape, names)
    adapter = AdapterShape(r=16, lora_alpha=32)
    return build_world(root / "bench" / shape, dict.fromkeys(names, adapter), hidden_size=64,
                       layers=2)  # fmt: skip


def _timed_merge(merger, task, folder: str, device: str) -> dict[str, float]:
    """One merge's stages one after the other, each synchronised: arithmetic, then the write
    path a worker runs (stage: the host copy queued; copy_to_host: waiting for it; serialise,
    hash, write)."""
    from raymerge.store.publish import stage, write_adapter

    inputs = merger.inputs(task.adapters)
    _sync(device)
    t0 = time.perf_counter()
    merged = merger.merge(task, inputs)
    _sync(device)
    stages = {"arithmetic": time.perf_counter() - t0}
    write_adapter(folder, stage(merged, stages), stages=stages)
    return stages


LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaMemcpyAsync", "cudaMemsetAsync"}  # fmt: skip
"""CUDA runtime calls that queue work on the device (kernels, copies, fills)."""
SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
"""CUDA runtime calls that wait on the host for the device."""


def _host_calls(merger, task, device: str) -> dict[str, int]:
    """One merge under torch's profiler: CUDA launches and synchronisations (none on the CPU),
    and value reads into Python (`aten::_local_scalar_dense`: a synchronisation on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    inputs = merger.inputs(task.adapters)
    with profile(activities=activities) as profiled:
        merger.merge(task, inputs)
    names = [event.name for event in profiled.events()]
    return {
        "launches_per_merge": sum(name in LAUNCHES for name in names),
        "syncs_per_merge": sum(name in SYNCS for name in names),
        "value_reads_per_merge": names.count("aten::_local_scalar_dense"),
    }


def _pipelined(world, device: str, tasks, out: Path) -> float:
    """Merges/s of the same tasks through a worker: merging beside its writer threads."""
    from raymerge.cluster.worker import MergeWorker

    worker = MergeWorker(0, _config(world, device, str(out)))
    worker.merge_many(tasks[:1], [0])  # warm-up
    started = time.perf_counter()
    results = worker.merge_many(tasks[1:], [0] * (len(tasks) - 1))
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if not r.done]
    if failed:
        raise RuntimeError(f"pipelined bench merges failed: {failed[:2]}")
    return (len(tasks) - 1) / seconds


def check_merge_bench(root: Path, device: str, size: str, log: Callable[[str], None]) -> list:
    """Merge-only throughput per type at each bench shape, with each stage's share of the time."""
    rows = []
    for shape in SIZES[size]["bench"]:
        rows += _merge_bench(root, _bench_world(root, shape), shape, device, size, log)
    return rows


def _merge_bench(root: Path, world, shape: str, device: str, size: str, log) -> list:
    from raymerge.cluster.merger import Merger

    names = tuple(world.adapters)
    pairs = list(itertools.combinations(names, 2))[: SIZES[size]["bench_pairs"]]
    merger = Merger(_config(world, device, ""))
    merger.inputs(names)  # loaded once, as a worker keeps them
    rows = []
    for n, name in enumerate(BENCH_TYPES):
        log(f"merge bench: {shape} {name}")
        out = root / "bench-out" / name
        tasks = [_task(pair, (0.6, 0.4), name, 16, 100 * n + i) for i, pair in enumerate(pairs)]
        _timed_merge(merger, tasks[0], str(out / "warm-up"), device)
        _reset_peak(device)
        stages = [_timed_merge(merger, t, str(out / t.merge_id), device) for t in tasks]
        total = sum(sum(s.values()) for s in stages)
        row = {"shape": shape, "type": name, "merges_per_s": round(len(tasks) / total, 2),
               "peak_mb": _peak_mb(device)}  # fmt: skip
        for stage in ("arithmetic", "serialise", "copy_to_host", "hash", "write"):
            row[f"{stage}_share"] = round(sum(s.get(stage, 0.0) for s in stages) / total, 3)
        shutil.rmtree(out, ignore_errors=True)
        row["pipelined_merges_per_s"] = round(_pipelined(world, device, tasks, out), 2)
        row.update(_host_calls(merger, tasks[0], device))
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def run_check(out: Path, device: str = "cuda", small: bool = False, log=print) -> dict[str, Any]:
    """Every part of the check; the figures as a dict (also written to out/gpu-check.json)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here (try --device cpu)")
    size = "small" if small else "full"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "size": size,
    }
    figures["types"] = check_types(out, device, size, log)
    figures["scoring"] = check_scoring(out, device, size, log)
    figures["merge_bench"] = check_merge_bench(out, device, size, log)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    exact = all(r["ok"] and r["repeatable"] and r["host_copy_exact"] for r in figures["types"])
    figures["ok"] = exact and all(
        r["failed"] == 0 and r["max_loss_diff_vs_1"] <= LOSS_TOLERANCE for r in figures["scoring"]
    )
    (out / "gpu-check.json").write_text(json.dumps(figures, indent=2))
    return figures


def table(figures: dict[str, Any]) -> str:
    """The figures as one plain-text table per part (for the README and a closing note)."""
    lines = [f"device {figures['device']}, torch {figures['torch']}, {figures['seconds']} s"]
    for part in ("types", "scoring", "merge_bench"):
        rows = figures[part]
        columns = list(rows[0])
        lines += ["", part, " | ".join(columns), " | ".join("---" for _ in columns)]
        lines += [" | ".join(str(row[c]) for c in columns) for row in rows]
    lines += ["", "all ok" if figures["ok"] else "NOT OK: see the rows above"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/raymerge-gpu-check"))
    parser.add_argument("--small", action="store_true", help="tiny sizes (the tests' dry run)")
    args = parser.parse_args(argv)
    figures = run_check(args.out, args.device, args.small, log=lambda m: print(m, flush=True))
    print(table(figures), flush=True)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
