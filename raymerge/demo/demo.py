"""`raymerge demo`: everything local, no network, a minute on a laptop CPU.

It builds a tiny Llama-architecture base model with a byte-level tokenizer, trains one LoRA
adapter per synthetic task (single-digit sums, reversed words, upper-casing), writes a text eval
set per task plus a multiple-choice set (pick the upper-cased word) and a generation set (write
the sum), and a sweep spec that merges every pair of adapters at several weights with several
combination types, scoring each merge on every set, ranked by one objective.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import yaml

from raymerge.merge.format import CONFIG_FILE

TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sums": lambda rng: (lambda a, b: (f"{a}+{b}=", str(a + b)))(
        rng.randint(0, 9), rng.randint(0, 9)
    ),
    "reverse": lambda rng: (lambda w: (f"{w}>", w[::-1]))(_word(rng)),
    "upper": lambda rng: (lambda w: (f"{w}:", w.upper()))(_word(rng)),
}
"""Each task: a generator of (prompt, answer) pairs with a pattern an adapter can learn; the
training text is prompt + answer + a newline."""

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def task_examples(task: str, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(count)]


def task_texts(task: str, count: int, seed: int) -> list[str]:
    return [f"{prompt}{answer}\n" for prompt, answer in task_examples(task, count, seed)]


def choice_examples(count: int, seed: int) -> list[dict]:
    """Upper-casing as multiple choice: the word upper-cased, against it reversed, unchanged,
    and upper-cased and reversed."""
    rng = random.Random(f"choice:{seed}")
    examples = []
    for prompt, answer in task_examples("upper", count, seed):
        word = prompt[:-1]
        choices = [answer, word[::-1], word, answer[::-1]]
        order = list(range(len(choices)))
        rng.shuffle(order)
        examples.append(
            {"prompt": prompt, "choices": [choices[i] for i in order], "answer": order.index(0)}
        )
    return examples


def train_adapter(base_model: Path, path: Path, task: str, *, steps: int = 200, seed: int = 0):
    """A LoRA adapter trained on one task's texts (tiny, a few seconds on a CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    texts = task_texts(task, steps * 16, seed=seed + 1)
    model.train()
    for step in range(steps):
        batch = texts[step * 16 : (step + 1) * 16]
        ids = [tokenizer(t)["input_ids"] for t in batch]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


def demo_spec(workers: int) -> dict:
    """Every pair of the task adapters, at several weights, through five combination types."""
    return {
        "base_model": "./world/base",
        "adapters": {task: f"./world/adapters/{task}" for task in TASKS},
        "combinations": [
            {
                "choose": 2,
                "weights": [[0.5, 0.5], [0.7, 0.3], [0.3, 0.7], [1.0, 1.0]],
                "methods": [
                    {"combination_type": "linear"},
                    {"combination_type": "cat"},
                    {"combination_type": "ties", "density": 0.5},
                    {"combination_type": "dare_linear", "density": 0.7},
                    {"combination_type": "svd", "svd_rank": 8},
                    # Two of the methods PEFT does not have, merged in the adapters' own space.
                    {"combination_type": "core_ties", "density": 0.5, "svd_rank": 8},
                    {"combination_type": "tsv", "svd_rank": 8},
                ],
            }
        ],
        "output": "./merges-out",
        "workers": workers,
        "gpus_per_worker": 0,
        "seed": 0,
        "evaluate": {
            "datasets": {
                **{task: f"./eval/{task}.jsonl" for task in TASKS},
                "upper_choice": {"path": "./eval/upper_choice.jsonl", "kind": "choice"},
                "sums_gen": {
                    "path": "./eval/sums_gen.jsonl",
                    "kind": "generate",
                    "max_new_tokens": 4,
                    "stop": ["\n"],
                },
            },
            "max_samples": 64,
            "batch_size": 16,
            "max_length": 32,
            "adapters_per_pass": 16,
            # Higher is better: upper-casing chosen right, sums generated right, minus the mean
            # loss on the three tasks' texts.
            "objective": [
                {"metric": "upper_choice.accuracy"},
                {"metric": "sums_gen.exact_match"},
                {"metric": "mean_loss"},
            ],
        },
    }


def search_spec(workers: int) -> dict:
    """A short adaptive search over the same adapters and objective: TPE, 12 evaluations."""
    spec = demo_spec(workers)
    spec["combinations"] = []
    spec["output"] = "./search-out"
    spec["search"] = {
        "choose": 2,
        "weights": {"low": 0.0, "high": 1.0},
        "methods": [
            {"combination_type": ["linear", "cat"]},
            {"combination_type": ["ties", "core_ties"], "density": {"low": 0.2, "high": 0.9}},
            {"combination_type": "tsv", "svd_rank": [4, 8, 16]},
        ],
        "budget": 12,
        "sampler": "tpe",
        "seed": 0,
    }
    return spec


def prepare_demo(out: Path, workers: int, log: Callable[[str], None] = print) -> Path:
    """Build the demo world under `out` (once) and write its sweep spec; returns the spec path."""
    from raymerge.demo.world import build_base_model

    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    base = world / "base"
    if not (base / "tokenizer.json").exists():
        build_base_model(base, hidden_size=64, layers=2, vocab_size=256)
    for i, task in enumerate(TASKS):
        adapter = world / "adapters" / task
        if not (adapter / CONFIG_FILE).exists():
            log(f"training the {task!r} adapter …")
            train_adapter(base, adapter, task, seed=10 + i)
        _write_jsonl(
            out / "eval" / f"{task}.jsonl", [{"text": t} for t in task_texts(task, 64, 999)]
        )
    _write_jsonl(out / "eval" / "upper_choice.jsonl", choice_examples(64, seed=998))
    sums = [{"prompt": p, "answer": a} for p, a in task_examples("sums", 64, seed=997)]
    _write_jsonl(out / "eval" / "sums_gen.jsonl", sums)
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(workers), sort_keys=False))
    (out / "search.yaml").write_text(yaml.safe_dump(search_spec(workers), sort_keys=False))
    return spec_path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
