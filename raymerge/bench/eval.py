"""`raymerge bench eval`: scored merges per second with 1, 4 and 16 merges per forward pass, the
merge-only rate, and the plain loop a user would write (load the merged adapter, evaluate it,
delete it), side by side in one run, on one worker in this process.

`world="generated"` uses a generated Llama-architecture model (configurable size) with random
adapters and three text sets; `world="demo"` uses the tiny demo's trained adapters and its three
text sets, and its 60 merges (every pair, four weightings, five types). The real model's bench is
against lm-evaluation-harness (`harness_race`).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

PASSES = (1, 4, 16)


def bench_eval(
    root: Path,
    *,
    world: str = "generated",
    hidden_size: int = 64,
    layers: int = 4,
    adapters: int = 4,
    weightings: int = 8,
    samples: int = 64,
    batch_size: int = 16,
    max_length: int = 32,
    threads: int = 2,
    log=print,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    if world == "generated":
        spec = _generated_spec(root, hidden_size, layers, adapters, weightings, samples, log)
    else:
        spec = _demo_spec(root, log)
    spec["evaluate"].update(max_samples=samples, batch_size=batch_size, max_length=max_length)
    figures: dict[str, Any] = {"world": world, "threads": threads}
    merges = None
    for per_pass in (0, *PASSES):  # 0: merge only
        log(f"timing {'merge only' if per_pass == 0 else f'{per_pass} merges per pass'}")
        seconds, merges, outputs = _run(root, spec, per_pass)
        key = "merge_only" if per_pass == 0 else f"per_pass_{per_pass}"
        figures[key] = {"merges_per_s": round(merges / seconds, 2), "seconds": round(seconds, 2)}
        if per_pass == 0:
            merge_only_seconds, merged = seconds, outputs
    log("timing the plain loop: load the merged adapter, evaluate, delete")
    plain = _plain_loop(spec, merged)
    figures["plain_loop"] = {"merges_per_s": round(merges / plain, 2), "seconds": round(plain, 2)}
    merge_per = merge_only_seconds / merges
    for key in ("plain_loop", *(f"per_pass_{k}" for k in PASSES)):
        eval_per = figures[key]["seconds"] / merges - (0 if key == "plain_loop" else merge_per)
        figures[key]["eval_seconds_per_merge"] = round(eval_per, 4)
    figures["merges"] = merges
    figures["per_pass_16_over_1"] = round(
        figures["per_pass_16"]["merges_per_s"] / figures["per_pass_1"]["merges_per_s"], 2
    )
    figures["eval_per_merge_1_over_16"] = round(
        figures["per_pass_1"]["eval_seconds_per_merge"]
        / figures["per_pass_16"]["eval_seconds_per_merge"],
        2,
    )
    return figures


def _generated_spec(root, hidden_size, layers, adapters, weightings, samples, log) -> dict:
    from raymerge.demo.demo import TASKS, task_texts
    from raymerge.demo.world import AdapterShape, build_world

    log(f"building a world: hidden {hidden_size}, {layers} layers, {adapters} adapters")
    names = [f"adapter{i}" for i in range(adapters)]
    shape = AdapterShape(r=8, lora_alpha=16)
    world = build_world(root / "world", dict.fromkeys(names, shape), hidden_size=hidden_size,
                        layers=layers)  # fmt: skip
    datasets = {}
    for task in TASKS:
        path = root / "eval" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        import json

        path.write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in task_texts(task, samples, 5))
        )
        datasets[task] = str(path)
    weights = _weightings(weightings)
    return {
        "base_model": str(world.base_model),
        "adapters": {n: str(p) for n, p in world.adapters.items()},
        "combinations": [
            {"choose": 2, "weights": weights, "methods": [{"combination_type": "linear"}]}
        ],
        "evaluate": {"datasets": datasets},
    }


def _weightings(count: int) -> list[list[float]]:
    return [[round(i / (count + 1), 4), round(1 - i / (count + 1), 4)]
            for i in range(1, count + 1)]  # fmt: skip


def _demo_spec(root: Path, log) -> dict:
    from raymerge.demo.demo import prepare_demo

    return _text_sets_of(prepare_demo(root / "demo", workers=1, log=log))


def _text_sets_of(demo: Path, texts: dict[str, str] | None = None) -> dict:
    """A demo's spec with absolute locations and text sets alone: `texts` (name -> path
    relative to the spec), else the spec's own."""
    spec = yaml.safe_load(demo.read_text())
    base = demo.parent
    spec["base_model"] = str(base / spec["base_model"])
    spec["adapters"] = {n: str(base / p) for n, p in spec["adapters"].items()}
    if texts is None:
        texts = {n: v for n, v in spec["evaluate"]["datasets"].items() if isinstance(v, str)}
    spec["evaluate"] = {"datasets": {n: str(base / p) for n, p in texts.items()}}
    return spec


def _run(root: Path, spec: dict, per_pass: int) -> tuple[float, int, list[Path]]:
    from raymerge.cluster.worker import MergeWorker
    from raymerge.store.manifest import merge_dir
    from raymerge.sweep.plan import load_plan

    folder = root / f"k{per_pass}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run_spec = {**spec, "output": str(folder / "output"), "workers": 1}
    if per_pass:
        run_spec["evaluate"] = {**spec["evaluate"], "adapters_per_pass": per_pass}
    else:
        run_spec.pop("evaluate")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(run_spec))
    plan = load_plan(path)
    worker = MergeWorker(0, plan.worker_config())
    tasks = list(plan.tasks())
    warm = worker.merge_many(tasks[:1], [0])  # adapters loaded, eval sets read and tokenized
    assert all(r.done for r in warm), warm[0].error
    started = time.perf_counter()
    step = max(per_pass, 1)
    for start in range(1, len(tasks), step):
        chunk = tasks[start : start + step]
        results = worker.merge_many(chunk, [0] * len(chunk))
        assert all(r.done for r in results), results[0].error
    seconds = time.perf_counter() - started
    folders = [Path(merge_dir(plan.output, task.merge_id)) for task in tasks]
    return seconds, len(tasks) - 1, folders


def _plain_loop(spec: dict, merged: list[Path]) -> float:
    """What a user would write: per merge, load its folder into the PeftModel, compute the loss
    on every eval set (one batch at a time, labels = inputs), delete it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.score import evalsets

    evaluate = spec["evaluate"]
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    sets = {
        name: evalsets.load(name, uri, "text", evaluate["max_samples"])
        for name, uri in evaluate["datasets"].items()
    }
    base = AutoModelForCausalLM.from_pretrained(spec["base_model"])
    model = PeftModel.from_pretrained(base, str(merged[0]), adapter_name="warm")  # warm-up
    model.eval()
    started = time.perf_counter()
    for i, folder in enumerate(merged[1:]):
        model.load_adapter(str(folder), adapter_name=f"m{i}")
        model.set_adapter(f"m{i}")
        with torch.inference_mode():
            for examples in sets.values():
                size = evaluate["batch_size"]
                for batch in (examples[i : i + size] for i in range(0, len(examples), size)):
                    ids = [
                        tokenizer(e["text"])["input_ids"][: evaluate["max_length"]] for e in batch
                    ]
                    width = max(len(x) for x in ids)
                    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
                    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
                    labels = input_ids.masked_fill(mask == 0, -100)
                    loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                    assert math.isfinite(float(loss))
        model.delete_adapter(f"m{i}")
    return time.perf_counter() - started
