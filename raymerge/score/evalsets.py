"""Eval sets: JSONL files of three kinds, read from any location and checked line by line (the plan
reads them before any cluster work; a bad line is named with its file and number).

- `text`: `{"text": ...}` — mean token loss and perplexity;
- `choice`: `{"prompt": ..., "choices": [...], "answer": i}` — accuracy from the summed
  log-likelihood of each choice given the prompt, and length-normalised accuracy (the
  log-likelihood divided by the choice's length in bytes), as lm-evaluation-harness computes them;
- `generate`: `{"prompt": ..., "answer": ...}` — exact match of the greedy continuation, cut at
  the first stop string, after normalisation (surrounding white space stripped, runs of white
  space made one space; case kept unless `ignore_case`).

Example:
    >>> parse_line("choice", '{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}', "qa", 1)
    {'prompt': '2+2=', 'choices': ['4', '5'], 'answer': 0}
    >>> normalise("  The   answer \\n", ignore_case=True)
    'the answer'
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from raymerge.errors import InputError
from raymerge.store import storage

KINDS = ("text", "choice", "generate")
METRICS = {
    "text": ("loss", "perplexity"),
    "choice": ("accuracy", "accuracy_norm"),
    "generate": ("exact_match",),
}
"""What each kind reports (besides its count of tokens or examples)."""
PRIMARY = {"text": "loss", "choice": "accuracy", "generate": "exact_match"}
LOWER_IS_BETTER = {"loss", "perplexity"}
FORMATS = {
    "text": '{"text": "..."}',
    "choice": '{"prompt": "...", "choices": ["...", "..."], "answer": 0}',
    "generate": '{"prompt": "...", "answer": "..."}',
}


def parse_line(kind: str, text: str, where: str, number: int) -> dict[str, Any]:
    """One example, checked; InputError naming `where` and the line number otherwise."""

    def bad(why: str) -> InputError:
        return InputError(
            f"{where} line {number}: {why}; each line of a {kind} set looks like {FORMATS[kind]}"
        )

    try:
        example = json.loads(text)
    except json.JSONDecodeError:
        raise bad("not valid JSON") from None
    if not isinstance(example, dict):
        raise bad("not a JSON object")
    if kind == "text":
        if not isinstance(example.get("text"), str):
            raise bad('no "text" string')
        return {"text": example["text"]}
    if not isinstance(example.get("prompt"), str):
        raise bad('no "prompt" string')
    if kind == "choice":
        choices = example.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise bad('"choices" must be a list of at least two strings')
        if not all(isinstance(c, str) and c for c in choices):
            raise bad("every choice must be a non-empty string")
        answer = example.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise bad('"answer" must be the index of the right choice')
        if not 0 <= answer < len(choices):
            raise bad(f'"answer" {answer} is out of range for {len(choices)} choices')
        return {"prompt": example["prompt"], "choices": choices, "answer": answer}
    if not isinstance(example.get("answer"), str):
        raise bad('no "answer" string')
    return {"prompt": example["prompt"], "answer": example["answer"]}


def load(
    name: str, uri: str, kind: str, max_samples: int, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The first `max_samples` examples of an eval set, each checked."""
    where = f"evaluate.datasets.{name} ({uri})"
    examples = []
    try:
        lines = storage.iter_text_lines(uri, storage_options)
        for number, text in enumerate(lines, start=1):
            if text.strip():
                examples.append(parse_line(kind, text, where, number))
                if len(examples) == max_samples:
                    break
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text; eval sets are JSONL files") from None
    except storage.errors() as exc:
        raise InputError(f"{where}: cannot be read: {storage.describe(exc)}") from exc
    if not examples:
        raise InputError(f"{where} has no examples")
    return examples


def digest(examples: list[dict[str, Any]]) -> str:
    """A digest of the examples scored (what a race's journal of scores is of)."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()


def normalise(text: str, ignore_case: bool = False) -> str:
    """What exact match compares: surrounding white space stripped, inner runs made one space."""
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if ignore_case else text


def cut_at_stop(text: str, stop: list[str]) -> str:
    """A generated continuation up to the first stop string."""
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text
