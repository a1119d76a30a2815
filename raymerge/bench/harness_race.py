"""`raymerge bench eval --world real`: raymerge's scoring against lm-evaluation-harness's on the
real model (SmolLM2-135M-Instruct), the same merged adapters, the same items.

- **Sets**: reading comprehension as a choice set (a passage of six three-word sentences, a
  question about one of them, four choices of three words), the passages as a text set, and
  the real demo's generation items (sums, reversal, title-casing; greedy until the newline).
- **raymerge**: one worker in this process per set scores the merges `per_pass` at a time,
  from the tensors it merged (written as float32, so that the harness reads the same values).
  Set by set, so that each kind's time is seen; the whole is their sum.
- **The harness**: its HF backend (`HFLM` around a `PeftModel` of each written merge), its
  `evaluate` over the same items as local tasks; task and model loading are not timed, nor are
  bootstrap error bars (`bootstrap_iters=0`): the time is the harness's own scoring.
- **Tokens**: what each one feeds the model per merge (padding included), counted at the input
  embedding; generated tokens count one per decoding step and row.
- **The floor**: the distinct tokens that must be computed (each context once, each choice's
  tokens but its last, each text window, each prompt and the answers' tokens), packed into rows of
  `max_length` with no padding, through the merged model's decoder once, plus the output layer
  at the positions read. Generation's steps cannot be batched into one pass; the floor does so,
  so it is a floor.
- Every metric of every set is compared: the largest difference, per metric.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import yaml

MERGES = 4
SENTENCES = 6


def bench_eval_real(
    root: Path,
    *,
    choice_items: int = 32,
    texts: int = 20,
    generated: int = 16,
    batch_size: int = 8,
    max_length: int = 256,
    threads: int = 2,
    per_pass: tuple[int, ...] = (1, 4),
    log=print,
) -> dict[str, Any]:
    """Seconds and tokens per merge, set by set and in all, for raymerge (`per_pass` merges
    per pass), the harness and the floor; the largest difference in each metric."""
    import torch

    torch.set_num_threads(threads)
    sets = _write_sets(root / "sets", choice_items, texts, generated)
    spec = _merges_spec(root, threads, log)
    folders = _write_merges(root, spec, log)
    evaluate = {"batch_size": batch_size, "max_length": max_length}
    ways = [f"raymerge_per_pass_{k}" for k in per_pass]
    figures: dict[str, Any] = {
        "world": "real", "threads": threads, "batch_size": batch_size, "max_length": max_length,
        "merges": MERGES, "items": {"choice": choice_items, "text": texts, "generate": generated},
        "sets": {}, "max_difference": {},
    }  # fmt: skip
    ours: dict[str, list[dict]] = {way: [{} for _ in range(MERGES)] for way in ways}
    for name, (path, kind, extra) in sets.items():
        datasets = {name: {"path": str(path), "kind": kind, **extra}}
        scoring = {**spec, "evaluate": {**evaluate, "datasets": datasets}}
        figures["sets"][name] = _score_set(root, scoring, per_pass, ours, log)
    log(f"lm-evaluation-harness: {MERGES} merges, one at a time, set by set")
    theirs = _time_harness(root, spec["base_model"], sets, folders, evaluate, figures["sets"])
    for way in ways:
        figures["max_difference"][way] = _differences(ours[way], theirs)
    figures["all"] = {way: _sum(row[way] for row in figures["sets"].values())
                      for way in [*ways, "harness", "floor"]}  # fmt: skip
    for row in [*figures["sets"].values(), figures["all"]]:
        for way in ways:
            row[way]["speedup_over_harness"] = _ratio(row["harness"], row[way])
            row[way]["over_floor"] = _ratio(row[way], row["floor"])
    return figures


def _merges_spec(root: Path, threads: int, log) -> dict[str, Any]:
    """Pairs of the real demo's adapters, linear, written as float32 (no eval sets)."""
    from raymerge.demo.real_demo import prepare_real_demo

    demo = prepare_real_demo(root / "real", log=log).parent
    return {
        "base_model": str(demo / "world" / "base"),
        "adapters": {name: str(demo / "world" / "adapters" / name)
                     for name in ("sums", "reverse", "title")},
        "combinations": [{"choose": 2, "weights": [[0.7, 0.7], [1.0, 0.5]],
                          "methods": [{"combination_type": "linear"}]}],
        "output": str(root / "merges"),
        "output_dtype": "float32",
        "workers": 1,
        "cpus_per_worker": threads,
    }  # fmt: skip


def _score_set(root: Path, spec: dict, per_pass, ours: dict, log) -> dict[str, Any]:
    """One set (the spec's only one), scored by raymerge `per_pass` merges at a time (each
    merge's metrics into `ours`), and its floor."""
    [(name, entry)] = spec["evaluate"]["datasets"].items()
    worker, merged = _scoring_worker(root, spec)
    row: dict[str, Any] = {"kind": entry["kind"]}
    for k in per_pass:
        log(f"raymerge: set {name} ({entry['kind']}), {MERGES} merges, {k} per pass")
        seconds, tokens, scores = _time_raymerge(worker, merged, k)
        row[f"raymerge_per_pass_{k}"] = _per_merge(seconds, tokens)
        for mine, score in zip(ours[f"raymerge_per_pass_{k}"], scores, strict=True):
            mine.update(score)
    log(f"the floor of set {name}: its distinct tokens, packed, one pass")
    evaluate = spec["evaluate"]
    row["floor"] = _floor(worker, merged[0], evaluate["max_length"], evaluate["batch_size"])
    worker.close()
    return row


def _per_merge(seconds: float, tokens: int) -> dict[str, Any]:
    return {"seconds_per_merge": round(seconds / MERGES, 3), "tokens_per_merge": tokens // MERGES}


def _sum(rows) -> dict[str, Any]:
    rows = list(rows)
    return {"seconds_per_merge": round(sum(r["seconds_per_merge"] for r in rows), 3),
            "tokens_per_merge": sum(r["tokens_per_merge"] for r in rows)}  # fmt: skip


def _ratio(slower: dict, faster: dict) -> float:
    return round(slower["seconds_per_merge"] / faster["seconds_per_merge"], 2)


def _words(rng: random.Random, count: int) -> list[str]:
    from raymerge.demo.skills import words

    return [rng.choice(words()) for _ in range(count)]


def _passage(rng: random.Random) -> tuple[str, list[str]]:
    """Six sentences of three words (each a single token: the skills' word list)."""
    triples = [" ".join(_words(rng, 3)) for _ in range(SENTENCES)]
    return " ".join(f"{t.capitalize()}." for t in triples), triples


def _write_sets(folder: Path, choice_items: int, texts: int, generated: int) -> dict:
    from raymerge.demo.demo import write_jsonl
    from raymerge.demo.skills import SKILLS, skill_examples

    rng = random.Random("raymerge bench eval real")
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth"]
    choice = []
    for i in range(choice_items):
        passage, triples = _passage(rng)
        asked = rng.randrange(SENTENCES)
        others = [t for j, t in enumerate(triples) if j != asked]
        options = [triples[asked], *rng.sample(others, 3)]
        answer = i % 4  # the right choice in every position
        options[0], options[answer] = options[answer], options[0]
        prompt = (f"{passage}\nQuestion: Which words make the {ordinals[asked]} sentence?\n"
                  "Answer:")  # fmt: skip
        choice.append({"prompt": prompt, "choices": options, "answer": answer})
    text = [{"text": _passage(rng)[0]} for _ in range(texts)]
    per_skill = -(-generated // len(SKILLS))
    items = [item for s in SKILLS for item in skill_examples(s, per_skill, "eval", seed=2)]
    generate = [{"prompt": p, "answer": a} for p, a in items[:generated]]
    return {
        "rc": (write_jsonl(folder / "rc.jsonl", choice), "choice", {}),
        "txt": (write_jsonl(folder / "txt.jsonl", text), "text", {}),
        "gen": (write_jsonl(folder / "gen.jsonl", generate), "generate", {"max_new_tokens": 8}),
    }


def _write_merges(root: Path, spec: dict, log) -> list[Path]:
    """The merges, made and written (as float32) by raymerge's worker, not scored."""
    from raymerge.cluster.worker import MergeWorker
    from raymerge.store.manifest import merge_dir

    plan = _plan(root / "merge.yaml", spec)
    writer = MergeWorker(0, plan.worker_config())
    tasks = list(plan.tasks())[:MERGES]
    log(f"merging {len(tasks)} pairs (linear), written as float32")
    results = writer.merge_many(tasks, [0] * len(tasks))
    assert all(r.done for r in results), results[0].error
    writer.close()
    return [Path(merge_dir(plan.output, t.merge_id)) for t in tasks]


def _scoring_worker(root: Path, spec: dict):
    """A worker that scores `spec`'s sets, and the same merges, made in its memory."""
    from raymerge.cluster.worker import MergeWorker

    plan = _plan(root / "score.yaml", spec)
    worker = MergeWorker(0, plan.worker_config())
    tasks = list(plan.tasks())[:MERGES]
    return worker, [worker.merger.merge(t, worker.merger.inputs(t.adapters)) for t in tasks]


def _plan(path: Path, spec: dict):
    from raymerge.sweep.plan import load_plan

    path.write_text(yaml.safe_dump(spec))
    return load_plan(path)


class _TokenCount:
    """Token ids fed to a model's input embedding while counting (padding included)."""

    def __init__(self, model):
        self.tokens = 0
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.tokens += args[0].numel()

    def close(self) -> int:
        self._handle.remove()
        return self.tokens


def _time_raymerge(worker, merged, per_pass: int):
    import dataclasses

    scorer = worker.scorer
    scorer.config = dataclasses.replace(scorer.config, adapters_per_pass=per_pass)
    scorer.score_merged(merged[:1])  # warm: sets read and tokenized, plans made
    counter = _TokenCount(worker.base.model)
    started = time.perf_counter()
    scores = []
    for start in range(0, len(merged), per_pass):
        scores += scorer.score_merged(merged[start : start + per_pass])
    seconds = time.perf_counter() - started
    return seconds, counter.close(), [_unrounded(s) for s in scores]


def _unrounded(scores) -> dict[str, dict[str, float]]:
    """A merge's metrics, the text sets' bits per byte from the per-example log-likelihoods
    (the metric itself is stored to 6 decimals, too coarse for a 1e-6 relative comparison)."""
    out = {}
    for name, metrics in scores.metrics.items():
        examples = scores.examples[name]
        out[name] = dict(metrics)
        if "bytes" in examples:
            total = sum(examples["loglikelihood"])
            out[name]["bits_per_byte"] = -total / sum(examples["bytes"]) / math.log(2)
    return out


def _floor(worker, adapter, max_length: int, batch_size: int) -> dict[str, Any]:
    """One pass of the merged model over the distinct tokens, packed without padding, and the
    output layer at the positions read."""
    import torch

    scorer = worker.scorer
    sequences: list[list[int]] = []
    read = 0
    for eval_set in scorer.sets().values():
        needed, positions = eval_set.distinct_work()
        sequences += needed
        read += positions
    flat = [t for s in sequences for t in s]
    width = max_length
    rows = [flat[i : i + width] for i in range(0, len(flat), width)]
    hidden = worker.base.model.config.hidden_size
    timings = []
    with scorer.active(adapter) as model, torch.inference_mode():
        decoder = model.get_base_model().model
        head = model.get_base_model().get_output_embeddings()
        for _ in range(3):  # the best of three
            started = time.perf_counter()
            for i in range(0, len(rows), batch_size):
                for group in _same_width(rows[i : i + batch_size]):
                    decoder(input_ids=torch.tensor(group), use_cache=False)
            for i in range(0, read, batch_size * width):
                head(torch.zeros(min(batch_size * width, read - i), hidden))
            timings.append(time.perf_counter() - started)
    return {"seconds_per_merge": round(min(timings), 3), "tokens_per_merge": len(flat),
            "positions_read": read}  # fmt: skip


def _same_width(rows: list[list[int]]) -> list[list[list[int]]]:
    full = [r for r in rows if len(r) == len(rows[0])]
    rest = [r for r in rows if len(r) != len(rows[0])]
    return [full] + ([[r] for r in rest] if rest else [])


def _time_harness(root, base_path, sets, folders, settings, rows) -> list[dict]:
    """The harness on each merge, set by set (its time and tokens into `rows`); each merge's
    results by set."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.quiet import quiet_libraries

    tasks_dir = _harness_tasks(root / "harness", sets)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # datasets reads the JSONL in-process
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    quiet_libraries()
    totals = {name: [0.0, 0] for name in sets}
    results: list[dict] = []
    for i, folder in enumerate([folders[0], *folders]):  # the first: a warm-up, not timed
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                          str(folder)).eval()  # fmt: skip
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings["batch_size"],
                  max_length=settings["max_length"], device="cpu")  # fmt: skip
        merge_results = {}
        for name in sets:
            manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
            tasks = manager.load([f"h_{name}"])
            counter = _TokenCount(model)
            started = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
                output = evaluate(lm, tasks, bootstrap_iters=0)
            seconds = time.perf_counter() - started
            tokens = counter.close()
            if i:
                totals[name][0] += seconds
                totals[name][1] += tokens
            merge_results[name] = output["results"][f"h_{name}"]
        if i:
            results.append(merge_results)
    for name, (seconds, tokens) in totals.items():
        rows[name]["harness"] = _per_merge(seconds, tokens)
    return results


def _harness_tasks(folder: Path, sets: dict) -> Path:
    from raymerge.bench.harness_tasks import task_yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, (path, kind, extra) in sets.items():
        text = task_yaml(f"h_{name}", kind, path, folder / "cache", **extra)
        (folder / f"h_{name}.yaml").write_text(text)
    return folder


METRICS = {
    "choice": {"accuracy": "acc", "accuracy_norm": "acc_norm"},
    "text": {"bits_per_byte": "bits_per_byte", "byte_perplexity": "byte_perplexity"},
    "generate": {"exact_match": "exact_match"},
}
"""Each kind's metrics that both report (raymerge's byte perplexity: 2 ** bits per byte)."""


def _differences(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    """The largest difference in each metric over the merges (choice and generate: absolute;
    text: relative)."""
    kinds = {"rc": "choice", "txt": "text", "gen": "generate"}
    out: dict[str, float] = {}
    for mine, harness in zip(ours, theirs, strict=True):
        for name, kind in kinds.items():
            values = {**mine[name], "byte_perplexity": 2 ** mine[name].get("bits_per_byte", 0)}
            for key, theirs_key in METRICS[kind].items():
                a, b = values[key], harness[name][f"{theirs_key},none"]
                # Means of 0/1 scores are stored to 6 decimals: compared as stored.
                gap = abs(a - b) / abs(b) if kind == "text" else abs(a - round(b, 6))
                label = f"{name}.{key}"
                out[label] = max(out.get(label, 0.0), gap)
    return {k: float(f"{v:.3g}") for k, v in out.items()}
