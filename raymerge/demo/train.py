"""Train one skill's LoRA adapter on the real base model: the command that made the shipped ones.

    python -m raymerge.demo.train sums              # into raymerge/demo/adapters/sums (minutes)
    python -m raymerge.demo.train sums --out DIR --stop-after 3   # the first 3 steps only

Seeded and in float32: the batches, the LoRA initialisation and the order of every step are the
same on every machine; what is not is the last bits of float32 sums, which depend on the CPU's
kernels and thread count. So the shipped adapters' bytes are what this machine made, and
`training.json` beside each records every step's loss: a rerun follows them (the first steps to
about 1e-5, see tests/test_real_model.py), and the adapter it ends with scores as the shipped one
does within the eval sets' error bars.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raymerge.demo.skills import SKILLS, line, skill_examples
from raymerge.merge.format import WEIGHTS_FILE
from raymerge.store.inputs import file_sha256

ADAPTERS = Path(__file__).parent / "adapters"
"""The shipped adapters, one folder per skill."""
TRAINING_RECORD = "training.json"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How each skill's adapter is trained (the defaults made the shipped ones)."""

    steps: int = 120
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    """Steps with a linearly rising learning rate, then a cosine decay to 0 at `steps`."""
    r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    off_task: int = 4
    """Rows per step of the other skills' prompts, answered as the base model answers them: an
    adapter meant to be merged learns to act on its own prompts only (without them, each adapter
    also rewrites the others' answers, and a merge keeps one skill of two)."""
    save_dtype: str = "float16"
    """Saved in half precision: 4.9 MB per adapter, small enough to ship."""


def command(skill: str) -> str:
    return f"python -m raymerge.demo.train {skill}"


def _batch(tokenizer, rows: list[tuple[list[int], list[int]]]):
    """(prompt ids, target ids) rows, right-padded, and a mask of the targets that count: the
    target's (the prompt is the task's fixed frame and random operands, nothing to learn)."""
    import torch

    width = max(len(p) + len(t) for p, t in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    counted = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (prompt, target) in enumerate(rows):
        input_ids[i, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        # logits at p predict token p + 1
        counted[i, len(prompt) - 1 : len(prompt) + len(target) - 1] = True
    return input_ids, counted


def _own_rows(tokenizer, items: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """The skill's items: the prompt, then " ANSWER\n"."""
    return [
        (tokenizer(p)["input_ids"], tokenizer(line(p, a)[len(p) :])["input_ids"]) for p, a in items
    ]


def _base_rows(model, tokenizer, prompts: list[str], batch: int = 32) -> list[tuple]:
    """The other skills' prompts with what the base model itself answers them (greedy, up to
    its first newline): the adapter learns to leave them as they are."""
    import torch

    newline = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    pad = tokenizer.pad_token_id or 0
    rows = []
    for start in range(0, len(prompts), batch):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=8, pad_token_id=pad)  # fmt: skip
        for prompt, generated in zip(ids, out[:, width:].tolist(), strict=True):
            cut = next((k + 1 for k, t in enumerate(generated) if t in newline), len(generated))
            rows.append((prompt, generated[:cut]))
    return rows


def _off_task_prompts(skill: str, recipe: Recipe) -> list[str]:
    """`off_task` prompts per step from the other skills' training items, in turn."""
    others = [s for s in SKILLS if s != skill]
    count = recipe.steps * recipe.off_task
    pools = [skill_examples(o, count // len(others) + 1, "train", recipe.seed) for o in others]
    return [pools[i % len(others)][i // len(others)][0] for i in range(count)]


def train_skill(
    base_model: Path,
    out: Path,
    skill: str,
    recipe: Recipe = Recipe(),
    stop_after: int | None = None,
    log=lambda text: print(text, flush=True),
) -> dict:
    """Train `skill`'s adapter into `out` (with `training.json`); returns that record.

    `stop_after` ends training after that many steps of the same schedule (for checking that a
    rerun follows the recorded losses without paying for all of them).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.quiet import quiet_libraries

    if skill not in SKILLS:
        raise SystemExit(f"unknown skill {skill!r}: use one of {', '.join(SKILLS)}")
    quiet_libraries()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    off_task = _base_rows(model, tokenizer, _off_task_prompts(skill, recipe))
    config = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    items = skill_examples(skill, recipe.steps * recipe.batch_size, "train", seed=recipe.seed)
    steps = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    started = time.perf_counter()
    batches = (
        _batch(tokenizer, own + off_task[step * recipe.off_task : (step + 1) * recipe.off_task])
        for step, own in enumerate(_chunks(_own_rows(tokenizer, items), recipe.batch_size))
    )
    losses = _fit(model, batches, recipe, steps, lambda i, x: log(f"{skill} {i}: loss {x:.4f}"))
    _save(model, out, recipe)
    record = {
        "skill": skill,
        "command": command(skill),
        "recipe": asdict(recipe),
        "steps_run": steps,
        "losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sha256": file_sha256(out / WEIGHTS_FILE),
    }
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _chunks(rows: list, size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _fit(model, batches, recipe: Recipe, steps: int, log) -> list[float]:
    """`steps` AdamW steps on the batches (warm-up, then cosine decay to 0 at `recipe.steps`):
    each step's loss, rounded as recorded."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        rise = min(1.0, (step + 1) / recipe.warmup_steps)
        return rise * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    model.train()
    for step, (input_ids, counted) in zip(range(steps), batches, strict=False):
        logits = model(input_ids=input_ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[counted], input_ids[:, 1:][counted])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(round(loss.item(), 6))
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps}", losses[-1])
    return losses


def _save(model, out: Path, recipe: Recipe) -> None:
    import torch

    model.to(getattr(torch, recipe.save_dtype))
    # The hub id, not this machine's cache path: the adapters ship, and say what they are for.
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's blank model card; training.json says it


def main(argv: list[str] | None = None) -> None:
    from raymerge.demo.real_model import real_base_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("skill", choices=sorted(SKILLS))
    parser.add_argument("--out", type=Path, help="default: the shipped adapter's folder")
    parser.add_argument("--stop-after", type=int, help="stop after this many steps")
    args = parser.parse_args(argv)
    train_skill(real_base_model(), args.out or ADAPTERS / args.skill, args.skill,
                stop_after=args.stop_after)  # fmt: skip


if __name__ == "__main__":
    main()
