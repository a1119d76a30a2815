"""Scoring merged adapters on the held base model, many per forward pass.

Up to `adapters_per_pass` merged adapters are loaded into the PeftModel together, from the exact
tensors written (no temporary folder), and every eval set is run once for all of them through
PEFT's mixed-adapter batches: each example appears once per adapter in the batch, and
`adapter_names` routes each row through its adapter (one base-layer pass for all). The metrics
equal those of scoring each adapter alone (one adapter per pass goes through the same mixed
batch, so that they are equal to the last bit on a bf16 base too). Each adapter is held in the
dtype its files hold (`slots`); log-probabilities are computed on the logits' device, in memory
bounded by `logprobs.extra_bytes_bound`. lm-evaluation-harness tasks, if any, run one adapter at
a time (the harness knows no mixed batches).

Examples become token rows by the harness's conventions (`requests`); metrics per eval set, each
with its standard error, are in `summaries`; an lm-eval task gives the harness's own. Every
adapter's per-example scores come back beside its metrics (`Scores`), for paired comparisons.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from raymerge.merge.tensors import MergedAdapter
from raymerge.score import evalsets
from raymerge.score.logprobs import token_logprobs
from raymerge.score.racing import example_order, window_positions
from raymerge.score.requests import choice_row, prefix_token_id, rolling_rows
from raymerge.score.slots import Slots, load_reference
from raymerge.score.summaries import Scored, choice_scores, mean_metrics, text_metrics
from raymerge.task import EvalConfig, Window

BASE = "__base__"
"""PEFT's name, in adapter_names, for a row that goes through no adapter."""


@dataclass
class Scores:
    """One adapter's scores: metrics per eval set (or lm-eval task), and per example."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, dict[str, list]] = field(default_factory=dict)


class Scorer:
    """Scores merged adapters (as written) and the references on the held base model."""

    def __init__(self, base, config: EvalConfig, storage_options: dict[str, Any] | None = None):
        self.base = base
        self.config = config
        self.storage_options = storage_options or {}
        self._sets: dict[str, _EvalSet] | None = None
        self._harness = None
        self._names = itertools.count()
        self._slots = Slots(base, capacity=4 * config.adapters_per_pass)
        self._window: tuple[Window, dict[str, _EvalSet]] | None = None  # the latest window's

    def sets(self) -> dict[str, _EvalSet]:
        """The eval sets, read and tokenized once with the base model's tokenizer."""
        if self._sets is None:
            tokenizer = self.tokenizer()
            self._sets = {
                name: _EvalSet(
                    name,
                    entry,
                    evalsets.load(
                        name,
                        entry["uri"],
                        entry.get("kind", "text"),
                        self.config.max_samples,
                        self.storage_options,
                    ),
                    tokenizer,
                    self.config.max_length,
                )
                for name, entry in self.config.datasets.items()
            }
        return self._sets

    def tokenizer(self):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.base.local_location())

    def score_merged(
        self, merged: Sequence[MergedAdapter], window: Window | None = None
    ) -> list[Scores]:
        """Scores of each merged adapter (its tensors as written), scored together: on every
        example, or on a race's `window` of each set (examples in the window's order; no
        lm-eval task, which the harness scores whole)."""
        names = [self._slots.load(adapter) for adapter in merged]
        try:
            if window is None:
                return self._score(names)
            return self._score(names, self._window_sets(window), harness=False)
        finally:
            self._slots.release(names)

    def _window_sets(self, window: Window) -> dict[str, _EvalSet]:
        """Each set's examples in `window` (sets it does not reach are left out); the latest
        window's are kept, as a race's calls come round by round."""
        if self._window is None or self._window[0] != window:
            sets = {}
            for name, full in self.sets().items():
                order = example_order(window.seed, name, len(full.examples))
                positions = window_positions(order, window.start, window.stop)
                if positions:
                    sets[name] = full.subset(positions)
            self._window = (window, sets)
        return self._window[1]

    def references(self, inputs) -> dict[str, Any]:
        """The base model alone and each input adapter alone, on every eval set: their metrics
        (`base`, `adapters`) and per-example scores (`examples`: the same shape)."""
        names = [f"ref_{next(self._names)}" for _ in inputs]
        for name, adapter in zip(names, inputs, strict=True):
            load_reference(self.base, adapter.folder, name)
        try:
            scores = self._score([None, *names])
        finally:
            self._unload(names)
        return {
            "base": scores[0].metrics,
            "adapters": {a.name: s.metrics for a, s in zip(inputs, scores[1:], strict=True)},
            "examples": {
                "base": scores[0].examples,
                "adapters": {a.name: s.examples for a, s in zip(inputs, scores[1:], strict=True)},
            },
        }

    def _unload(self, names: list[str]) -> None:
        # PEFT says so each time the active adapter goes; here that is the plan, not news.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for name in names:
                self.base.peft.delete_adapter(name)

    def _score(
        self,
        names: list[str | None],
        sets: dict[str, _EvalSet] | None = None,
        harness: bool = True,
    ) -> list[Scores]:
        """Scores per adapter (None: the base model alone), `adapters_per_pass` at a time."""
        sets = self.sets() if sets is None else sets
        results = [Scores() for _ in names]
        step = self.config.adapters_per_pass
        for start in range(0, len(names), step):
            chunk = names[start : start + step]
            loaded = [name for name in chunk if name is not None]
            if loaded:  # PEFT reads the active adapter's config in every forward: a live one
                self.base.peft.set_adapter(loaded[0])
            for set_name, eval_set in sets.items():
                for offset, scored in enumerate(eval_set.score(self._model(), chunk, self)):
                    results[start + offset].metrics[set_name] = scored.metrics
                    results[start + offset].examples[set_name] = scored.examples
        if self.config.lm_eval and harness:
            for i, name in enumerate(names):
                results[i].metrics.update(self._harness_scores(name))
        return results

    def _model(self):
        """The PeftModel when adapters are loaded, else the bare base model."""
        peft = self.base.peft
        return peft if peft is not None and peft.peft_config else self.base.model

    def _harness_scores(self, name: str | None) -> dict[str, Any]:
        from raymerge.score.harness import Harness

        if self._harness is None:
            self._harness = Harness(self.config.lm_eval, self.tokenizer())
        return self._harness.score(self.base.peft, name)


def adapter_rows(names: list[str | None], rows: int) -> list[str]:
    """adapter_names for `rows` examples repeated once per adapter, adapter by adapter."""
    return [BASE if name is None else name for name in names for _ in range(rows)]


def _routing(model, names: list[str | None], rows: int) -> dict[str, Any]:
    """How a batch reaches its adapters: through PEFT's mixed-adapter batch (`adapter_names`,
    one per row), for one adapter as for several. PEFT's plain forward adds an adapter's output
    to the base layer's before rounding to the base dtype, the mixed batch after: one path for
    every pass is what makes K merges per pass score exactly as one at a time on a bf16 base."""
    if not _is_peft(model):
        return {}
    return {"adapter_names": adapter_rows(names, rows)}


class _EvalSet:
    """One eval set, tokenized, and how its kind is scored."""

    def __init__(self, name, entry, examples, tokenizer, max_length: int):
        self.name = name
        self.kind = entry.get("kind", "text")
        self.entry = entry
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id or tokenizer.eos_token_id or 0
        self._tokens: dict[str, list[int]] = {}
        self._batches: dict[int, _Prepared] = {}  # batch size -> the rows to run
        self._rows: list[tuple[list[int], int]] | None = None  # scored rows, made once
        self._owners: list[int] = []  # the example of each row

    def subset(self, positions: list[int]) -> _EvalSet:
        """The same set over some of its examples, in that order (token ids shared)."""
        part = _EvalSet(
            self.name,
            self.entry,
            [self.examples[i] for i in positions],
            self.tokenizer,
            self.max_length,
        )
        part._tokens = self._tokens
        return part

    def score(self, model, names: list[str | None], scorer: Scorer) -> list[Scored]:
        batch_size = scorer.config.batch_size
        if self.kind == "text":
            return self._text(model, names, batch_size)
        if self.kind == "choice":
            return self._choice(model, names, batch_size)
        return self._generate(model, names, batch_size)

    def _ids(self, text: str) -> list[int]:
        """Token ids as the harness encodes them, computed once per text (every merge is
        scored on the same texts)."""
        ids = self._tokens.get(text)
        if ids is None:
            starts = text.startswith(self.tokenizer.decode(prefix_token_id(self.tokenizer)))
            special = {"add_special_tokens": False} if starts else {}  # no second BOS
            ids = self._tokens[text] = self.tokenizer(text, **special)["input_ids"]
        return ids

    def _bare_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prepared(self, rows: list[tuple[list[int], int]], batch_size: int) -> _Prepared:
        """The rows to run, made once per batch size: each distinct (sequence, first target)
        once, longest first (as the harness sorts its requests: batches of like lengths pad
        little), as padded tensors batch by batch."""
        if batch_size not in self._batches:
            distinct: dict[tuple, int] = {}
            where = [distinct.setdefault((tuple(ids), first), len(distinct)) for ids, first in rows]
            keys = list(distinct)
            order = sorted(range(len(keys)), key=lambda u: (-len(keys[u][0]), keys[u]))
            batches = [
                _prepare(
                    [list(keys[u][0]) for u in chunk], [keys[u][1] for u in chunk], self.pad_id
                )
                for chunk in _chunks(order, batch_size)
            ]
            self._batches[batch_size] = _Prepared(batches, order, where)
        return self._batches[batch_size]

    def _row_logliks(self, model, names, rows, batch_size) -> list[list[float]]:
        """Each row's summed log-probability of its scored tokens, per adapter (a row that
        repeats another is run once)."""
        prepared = self._prepared(rows, batch_size)
        distinct = torch.zeros(len(names), len(prepared.order), dtype=torch.float64)
        start = 0
        for batch in prepared.batches:
            sums = target_logprobs(model, batch, names)
            distinct[:, prepared.order[start : start + sums.shape[1]]] = sums
            start += sums.shape[1]
        return distinct[:, prepared.where].tolist()

    def _text(self, model, names, batch_size) -> list[Scored]:
        # The harness's rolling log-likelihood: every token, the first given the prefix token.
        if self._rows is None:
            prefix = prefix_token_id(self.tokenizer)
            self._rows, self._owners = [], []
            for e, example in enumerate(self.examples):
                for row in rolling_rows(self._ids(example["text"]), prefix, self.max_length):
                    self._rows.append(row)
                    self._owners.append(e)
        tokens = [0] * len(self.examples)
        for (ids, first), e in zip(self._rows, self._owners, strict=True):
            tokens[e] += len(ids) - first
        size = [len(e["text"].encode("utf-8")) for e in self.examples]
        out = []
        for values in self._row_logliks(model, names, self._rows, batch_size):
            loglik = [0.0] * len(self.examples)
            for value, e in zip(values, self._owners, strict=True):
                loglik[e] += value
            examples = {"loglikelihood": [round(v, 6) for v in loglik], "tokens": tokens}
            examples["bytes"] = size
            out.append(Scored(text_metrics(loglik, tokens, size), examples))
        return out

    def _choice(self, model, names, batch_size) -> list[Scored]:
        if self._rows is None:  # one row per (example, choice), as the harness builds them
            delimiter = self.entry.get("target_delimiter", " ")
            prefix = prefix_token_id(self.tokenizer)
            self._rows, self._owners = [], []
            for e, example in enumerate(self.examples):
                for choice in example["choices"]:
                    self._rows.append(
                        choice_row(
                            self._ids, self._bare_ids, prefix, example["prompt"],
                            delimiter + choice, self.max_length,
                        )
                    )  # fmt: skip
                    self._owners.append(e)
        out = []
        for values in self._row_logliks(model, names, self._rows, batch_size):
            per_example: list[list[float]] = [[] for _ in self.examples]
            for value, e in zip(values, self._owners, strict=True):
                per_example[e].append(value)
            out.append(choice_scores(self.examples, per_example))
        return out

    @torch.inference_mode()
    def _generate(self, model, names, batch_size) -> list[Scored]:
        stop = self.entry.get("stop", ["\n"])
        ignore_case = self.entry.get("ignore_case", False)
        new_tokens = self.entry.get("max_new_tokens", 32)
        right: list[list[int]] = [[] for _ in names]
        device = next(model.parameters()).device
        for batch in _chunks(self.examples, batch_size):
            prompts = [self._ids(e["prompt"])[-self.max_length :] for e in batch]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(prompts), width, dtype=torch.long)
            for row, ids in enumerate(prompts):  # left-padded: generation continues at the end
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            kwargs = _routing(model, names, len(batch))
            generated = model.generate(
                input_ids=input_ids.repeat(len(names), 1).to(device),
                attention_mask=mask.repeat(len(names), 1).to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                **kwargs,
            )
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for k in range(len(names)):
                for i, example in enumerate(batch):
                    answer = evalsets.cut_at_stop(texts[k * len(batch) + i], stop)
                    right[k].append(
                        int(
                            evalsets.normalise(answer, ignore_case)
                            == evalsets.normalise(example["answer"], ignore_case)
                        )
                    )
        return [Scored(mean_metrics({"exact_match": r}), {"exact_match": r}) for r in right]


@dataclass(frozen=True)
class _Prepared:
    """A set's rows as they are run: `batches` of padded tensors over the distinct rows in
    `order` (longest first), and `where` each of the set's rows is among the distinct ones."""

    batches: list[tuple]
    order: list[int]
    where: list[int]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _prepare(sequences: list[list[int]], first_targets: list[int], pad_id: int) -> tuple:
    """Right-padded ids, attention mask, and which next-token positions are targets."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
    for row, (ids, first) in enumerate(zip(sequences, first_targets, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        targets[row, first - 1 : len(ids) - 1] = True  # logits at p predict token p + 1
    return input_ids, mask, targets


@torch.inference_mode()
def target_logprobs(model, batch: tuple, names: list[str | None]) -> torch.Tensor:
    """Summed log-probabilities of each sequence's target tokens (each given what precedes it),
    for every adapter in one pass: [adapter, sequence], float64, on the CPU.

    The inputs go to the device of the model's first parameter; the logits come back wherever
    the model leaves them (on a sharded model, maybe `lm_head`'s device) and are scored there,
    in the memory `logprobs.extra_bytes_bound` gives.
    """
    input_ids, mask, targets = batch
    rows, k = input_ids.shape[0], len(names)
    device = next(model.parameters()).device
    ids = input_ids.repeat(k, 1).to(device)
    logits = model(
        input_ids=ids, attention_mask=mask.repeat(k, 1).to(device), **_routing(model, names, rows)
    ).logits
    picked = token_logprobs(logits, ids, targets.repeat(k, 1))
    return picked.double().sum(dim=1).cpu().view(k, rows)
