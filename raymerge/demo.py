"""`raymerge demo`: everything local, no network, a minute on a laptop CPU.

It builds a tiny Llama-architecture base model with a byte-level tokenizer, trains one LoRA
adapter per synthetic task (sums, reversed words, upper-casing), writes an eval set per task, and
writes a sweep spec that merges every pair of adapters at several weights with several
combination types, scoring each merge on every task.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import yaml

TASKS: dict[str, Callable[[random.Random], str]] = {
    "sums": lambda rng: (lambda a, b: f"{a}+{b}={a + b}")(rng.randint(0, 49), rng.randint(0, 49)),
    "reverse": lambda rng: (lambda w: f"{w}>{w[::-1]}")(_word(rng)),
    "upper": lambda rng: (lambda w: f"{w}:{w.upper()}")(_word(rng)),
}
"""Each task: a generator of short texts with a pattern an adapter can learn."""

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def task_texts(task: str, count: int, seed: int) -> list[str]:
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(count)]


def train_adapter(base_model: Path, path: Path, task: str, *, steps: int = 120, seed: int = 0):
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
                ],
            }
        ],
        "output": "./merges-out",
        "workers": workers,
        "gpus_per_worker": 0,
        "seed": 0,
        "evaluate": {
            "datasets": {task: f"./eval/{task}.jsonl" for task in TASKS},
            "max_samples": 64,
            "batch_size": 16,
            "max_length": 32,
        },
    }


def prepare_demo(out: Path, workers: int, log: Callable[[str], None] = print) -> Path:
    """Build the demo world under `out` (once) and write its sweep spec; returns the spec path."""
    from raymerge.world import build_base_model

    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    base = world / "base"
    if not (base / "tokenizer.json").exists():
        build_base_model(base, hidden_size=64, layers=2, vocab_size=256)
    for i, task in enumerate(TASKS):
        adapter = world / "adapters" / task
        if not (adapter / "adapter_config.json").exists():
            log(f"training the {task!r} adapter …")
            train_adapter(base, adapter, task, seed=10 + i)
        eval_set = out / "eval" / f"{task}.jsonl"
        eval_set.parent.mkdir(exist_ok=True)
        lines = (json.dumps({"text": t}) for t in task_texts(task, 64, seed=999))
        eval_set.write_text("\n".join(lines) + "\n")
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(workers), sort_keys=False))
    return spec_path
