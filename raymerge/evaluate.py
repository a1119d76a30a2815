"""Scoring a model (the held base model, with or without an adapter) on small eval sets: mean
token loss and perplexity, in inference mode, on the model's own devices.

Example:
    >>> batches = make_batches(tokenizer, ["3+4=7", "2+2=4"], batch_size=8, max_length=64)
    >>> score(model, batches)  # doctest: +SKIP
    {'loss': 1.83, 'perplexity': 6.23, 'tokens': 8}
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from raymerge import storage
from raymerge.errors import InputError


def load_texts(
    name: str, uri: str, max_samples: int, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """The first `max_samples` `text` fields of a JSONL eval set."""
    texts = []
    data = storage.read_bytes(uri, storage_options).decode()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f"evaluate.datasets.{name} ({uri}) line {number}: not a JSON object with a "
                '"text" field; each line must look like {"text": "..."}'
            ) from None
        texts.append(str(text))
        if len(texts) == max_samples:
            break
    if not texts:
        raise InputError(f"evaluate.datasets.{name} ({uri}) has no samples")
    return texts


def make_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Right-padded token batches; padding and each sequence's first token are not scored."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            for text in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


@torch.inference_mode()
def score(model, batches: list[dict]) -> dict[str, float]:
    """Mean next-token loss over every scored token, and its perplexity."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        tokens += int((targets != -100).sum())
    loss = total / max(tokens, 1)
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 700)), 6),
        "tokens": tokens,
    }


class Scorer:
    """Scores merged adapters (as written) and references on the held base model."""

    def __init__(self, base, config, storage_options: dict[str, Any] | None = None):
        self.base = base
        self.config = config
        self.storage_options = storage_options or {}
        self._batches: dict[str, list] | None = None
        self._names = itertools.count()

    def batches(self) -> dict[str, list]:
        """The eval sets, tokenized once with the base model's tokenizer."""
        if self._batches is None:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(self.base.local_location())
            self._batches = {
                name: make_batches(
                    tokenizer,
                    load_texts(name, entry["uri"], self.config.max_samples, self.storage_options),
                    self.config.batch_size,
                    self.config.max_length,
                )
                for name, entry in self.config.datasets.items()
            }
        return self._batches

    def score_files(self, files: dict[str, bytes]) -> dict[str, dict[str, float]]:
        """Score a merged adapter as written: its files, loaded as a user would load them."""
        name = f"eval_{next(self._names)}"
        with tempfile.TemporaryDirectory(prefix="raymerge-eval-") as tmp:
            for file_name, data in files.items():
                (Path(tmp) / file_name).write_bytes(data)
            model = self.base.load_adapter(tmp, name)
        try:
            return self._score(model, name)
        finally:
            model.delete_adapter(name)

    def references(self, inputs) -> dict[str, Any]:
        """The base model alone and each input adapter alone, on every eval set."""
        references: dict[str, Any] = {"base": self._score(self.base.peft, None), "adapters": {}}
        for adapter in inputs:
            name = f"ref_{next(self._names)}"
            model = self.base.load_adapter(adapter.folder, name)
            try:
                references["adapters"][adapter.name] = self._score(model, name)
            finally:
                model.delete_adapter(name)
        return references

    def _score(self, model, adapter: str | None) -> dict[str, dict[str, float]]:
        """Metrics per eval set with only `adapter` active (None: the base model alone)."""
        batches = self.batches()
        if model is None or not model.peft_config:
            return {ds: score(self.base.model, b) for ds, b in batches.items()}
        if adapter is None:
            with model.disable_adapter():
                return {ds: score(model, b) for ds, b in batches.items()}
        model.set_adapter(adapter)
        return {ds: score(model, b) for ds, b in batches.items()}
