"""`raymerge demo`: everything local, no network, a minute on a laptop CPU.

It builds a tiny Llama-architecture base model with a byte-level tokenizer, trains one LoRA
adapter per synthetic task (single-digit sums, reversed words, upper-casing), writes a text eval
set per task plus a multiple-choice set (pick the upper-cased word) and a generation set (write
the sum), and a sweep spec that merges every pair of adapters at several weights with several
combination types, scoring each merge on every set, ranked by one objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
"""Each task: a generator of (prompt, answer) pairs with a pattern an adapter can learn. Every
text is `example_text(prompt, answer)`: prompt, a space, answer, a newline — the form a choice
set is scored in (the harness's continuation is " " + choice) and a generation set answered in
(exact match strips the space)."""

WORD_LENGTH = 4
"""Letters per word: one length, so that copying a word is one fixed offset, which the tiny
adapters learn in a few hundred steps (with lengths 3 to 7 they learn the case but not the
order)."""

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True)
class Training:
    """How each demo adapter is trained; the defaults give each a clear skill in ~10 s."""

    steps: int = 350
    batch_size: int = 32
    lr: float = 5e-3
    warmup: float = 0.1
    """Share of the steps with a linearly rising learning rate (then a cosine decay to 0)."""
    r: int = 16
    lora_alpha: int = 32
    prompt_weight: float = 0.05
    """Loss weight of the prompt's tokens (the answer's weigh 1): the prompts are random (digits,
    letters), and their noise at full weight slows learning the answer several times over."""
    prefixed_share: int = 2
    """Every this many rows starts with the prefix token, which text sets are scored after (the
    harness's rolling log-likelihood); the others start at the prompt, as choice and generation
    sets are scored."""


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LENGTH))


def example_text(prompt: str, answer: str) -> str:
    return f"{prompt} {answer}\n"


def task_examples(task: str, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(count)]


def task_texts(task: str, count: int, seed: int) -> list[str]:
    return [example_text(prompt, answer) for prompt, answer in task_examples(task, count, seed)]


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


@contextlib.contextmanager
def _reproducible(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, float64 by default and the global RNGs seeded, all put
    back afterwards: training then gives the same bytes whatever the thread count or CPU."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _training_batch(tokenizer, examples: list[tuple[str, str]], training: Training):
    """Right-padded token ids, and each next-token target's loss weight."""
    import torch

    from raymerge.score.requests import prefix_token_id

    prefix = prefix_token_id(tokenizer)
    rows, prompt_lengths = [], []
    for i, (prompt, answer) in enumerate(examples):
        lead = [prefix] if i % training.prefixed_share == 0 else []
        rows.append(lead + tokenizer(example_text(prompt, answer))["input_ids"])
        prompt_lengths.append(len(lead) + len(tokenizer(prompt)["input_ids"]))
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    weights = torch.zeros(len(rows), width - 1, dtype=torch.float64)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        weights[i, : len(row) - 1] = training.prompt_weight
        weights[i, prompt_length - 1 : len(row) - 1] = 1.0  # logits at p predict token p + 1
    return input_ids, weights


def train_adapter(
    base_model: Path, path: Path, task: str, *, seed: int = 0, training: Training = Training()
) -> Path:
    """A LoRA adapter trained on one task's texts (tiny: about 10 CPU seconds).

    Reproducible to the byte: trained on one thread with deterministic kernels in float64, every
    parameter and optimiser moment rounded to float32 after each step (so that what a CPU's
    kernels round differently in float64 never reaches the next step), saved in float32.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _reproducible(seed):
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float64)
        config = LoraConfig(
            r=training.r,
            lora_alpha=training.lora_alpha,
            target_modules=list(TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.0)
        warmup = max(1, round(training.warmup * training.steps))

        def schedule(step: int) -> float:
            rise = min(1.0, (step + 1) / warmup)
            return rise * 0.5 * (1 + math.cos(math.pi * step / training.steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        size = training.batch_size
        examples = task_examples(task, training.steps * size, seed=seed + 1)
        model.train()
        for step in range(training.steps):
            input_ids, weights = _training_batch(
                tokenizer, examples[step * size : (step + 1) * size], training
            )
            logits = model(input_ids=input_ids).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
            )
            loss = (losses * weights.reshape(-1)).sum() / weights.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            with torch.no_grad():
                for param in params:
                    state = optimizer.state[param]
                    for tensor in (param, state["exp_avg"], state["exp_avg_sq"]):
                        tensor.copy_(tensor.to(torch.float32))
        model.to(torch.float32)
        # The base's lm_head is not the adapter's to carry (PEFT would save a copy of it).
        model.save_pretrained(path, save_embedding_layers=False)
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
        write_jsonl(
            out / "eval" / f"{task}.jsonl", [{"text": t} for t in task_texts(task, 64, 999)]
        )
    write_jsonl(out / "eval" / "upper_choice.jsonl", choice_examples(64, seed=998))
    sums = [{"prompt": p, "answer": a} for p, a in task_examples("sums", 64, seed=997)]
    write_jsonl(out / "eval" / "sums_gen.jsonl", sums)
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(demo_spec(workers), sort_keys=False))
    (out / "search.yaml").write_text(yaml.safe_dump(search_spec(workers), sort_keys=False))
    return spec_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object a line (an eval set), its folder made; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
