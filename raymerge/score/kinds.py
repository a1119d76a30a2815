"""One eval set, tokenized once, and how each kind is scored on K merges at a time: its rows
made by the harness's conventions (`requests`), planned once (`plan`: each request once,
longest first, packed), run through the model's passes (`passes`), and each example's score put
back in the set's order."""

from __future__ import annotations

from typing import Any

import torch

from raymerge.score import evalsets, passes
from raymerge.score.plan import Row, choice_plan, generate_plan, row_plan, split
from raymerge.score.requests import choice_row, prefix_token_id, rolling_rows
from raymerge.score.summaries import Scored, choice_scores, mean_metrics, text_metrics


class EvalSet:
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
        self._plans: dict[tuple[str, int], Any] = {}  # (plan kind, batch size) -> plan
        self._rows: list[Row] | None = None  # scored rows, made once
        self._owners: list[int] = []  # the example of each row

    def subset(self, positions: list[int]) -> EvalSet:
        """The same set over some of its examples, in that order (token ids shared)."""
        part = EvalSet(
            self.name,
            self.entry,
            [self.examples[i] for i in positions],
            self.tokenizer,
            self.max_length,
        )
        part._tokens = self._tokens
        return part

    def score(self, model, names: list[str | None], batch_size: int) -> list[Scored]:
        # A pass holds what batch_size rows of max_length do: short rows share larger passes.
        budget = batch_size * (self.max_length + 1)
        if self.kind == "text":
            return self._text(model, names, budget)
        if self.kind == "choice":
            return self._choice(model, names, budget)
        return self._generate(model, names, budget)

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

    def _plan(self, kind: str, budget: int, make):
        if (kind, budget) not in self._plans:
            self._plans[kind, budget] = make()
        return self._plans[kind, budget]

    def _row_logliks(self, model, names, budget) -> list[list[float]]:
        """Each row's summed log-probability of its scored tokens, per adapter (a row that
        repeats another is run once)."""
        plan = self._plan("rows", budget, lambda: row_plan(self.rows(), budget))
        distinct = torch.zeros(len(names), len(plan.rows), dtype=torch.float64)
        for batch in plan.batches:
            width = len(plan.rows[batch[0]][0]) - 1
            for part in self._parts(batch, len(names), width, budget):
                rows = [plan.rows[u] for u in part]
                distinct[:, part] = passes.row_logliks(model, rows, names, self.pad_id, width)
        return distinct[:, plan.where].tolist()

    def _choice_logliks(self, model, names, budget) -> list[list[float]]:
        """Each (question, choice) row's log-likelihood, per adapter: each distinct context
        run once per merge with its choices after it. Models that cannot take a row's own
        attention mask score the rows whole."""
        if not passes.shares_contexts(model):
            return self._row_logliks(model, names, budget)
        plan = self._plan("choice", budget, lambda: choice_plan(self.rows(), budget))
        distinct = torch.zeros(len(names), len(plan.continuations), dtype=torch.float64)
        for batch in plan.batches:
            width = plan.width(batch.groups[0])
            size = len(self._parts(batch.groups, len(names), width, budget)[0])
            for part in split(batch, size):
                if part.members:
                    members = [u for u, _ in part.members]
                    distinct[:, members] = passes.choice_logliks(
                        model, plan, part, names, self.pad_id, width
                    )
        return distinct[:, plan.where].tolist()

    def rows(self) -> list[Row]:
        """The set's scored rows (text and choice), made once, as the harness builds them:
        a text's rolling windows (every token, the first given the prefix token); one row per
        (example, choice)."""
        if self._rows is None:
            prefix = prefix_token_id(self.tokenizer)
            rows, owners = [], []
            delimiter = self.entry.get("target_delimiter", " ")
            for e, example in enumerate(self.examples):
                if self.kind == "text":
                    made = rolling_rows(self._ids(example["text"]), prefix, self.max_length)
                else:
                    made = [
                        choice_row(
                            self._ids, self._bare_ids, prefix, example["prompt"],
                            delimiter + choice, self.max_length,
                        )
                        for choice in example["choices"]
                    ]  # fmt: skip
                rows += made
                owners += [e] * len(made)
            self._rows, self._owners = rows, owners
        return self._rows

    def distinct_work(self) -> tuple[list[list[int]], int]:
        """What any scorer must compute for one merge: the token sequences each distinct
        request needs (a choice's context once, its tokens but the last; a text window; a
        prompt and its answer's tokens but the last) and how many positions' logits are read."""
        if self.kind == "generate":
            new_tokens = self.entry.get("max_new_tokens", 32)
            sequences, read = [], 0
            for prompt in dict.fromkeys(e["prompt"] for e in self.examples):
                answer = self._bare_ids(" " + self._answer_of(prompt) + "\n")[:new_tokens]
                sequences.append(self._ids(prompt) + answer[:-1])
                read += len(answer)
            return sequences, read
        if self.kind == "choice":
            plan = choice_plan(self.rows(), budget=1)
            sequences = [list(c) for c in plan.contexts]
            sequences += [list(c[:-1]) for c in plan.continuations if len(c) > 1]
            return sequences, sum(map(len, plan.continuations))
        plan = row_plan(self.rows(), budget=1)
        return [ids[:-1] for ids, _ in plan.rows], sum(len(ids) - first for ids, first in plan.rows)

    def _parts(self, rows: list[int], merges: int, width: int, budget: int) -> list[list[int]]:
        """A pass's rows in forwards for all `merges` together: the pass's `budget` tokens per
        merge hold the rows; K merges split it into forwards of `budget` tokens in all, but of
        `batch_size` rows per merge at least (as many as a pass of max_length rows has). The
        plan is the same whatever K, so that every row is padded alike."""
        least = budget // (self.max_length + 1)  # batch_size
        size = max(least, budget // (merges * max(width, 1)))
        return [rows[start : start + size] for start in range(0, len(rows), size)]

    def _answer_of(self, prompt: str) -> str:
        return next(e["answer"] for e in self.examples if e["prompt"] == prompt)

    def _text(self, model, names, budget) -> list[Scored]:
        self.rows()
        tokens = [0] * len(self.examples)
        for (ids, first), e in zip(self._rows, self._owners, strict=True):
            tokens[e] += len(ids) - first
        size = [len(e["text"].encode("utf-8")) for e in self.examples]
        out = []
        for values in self._row_logliks(model, names, budget):
            loglik = [0.0] * len(self.examples)
            for value, e in zip(values, self._owners, strict=True):
                loglik[e] += value
            examples = {"loglikelihood": [round(v, 6) for v in loglik], "tokens": tokens}
            examples["bytes"] = size
            out.append(Scored(text_metrics(loglik, tokens, size), examples))
        return out

    def _choice(self, model, names, budget) -> list[Scored]:
        self.rows()
        out = []
        for values in self._choice_logliks(model, names, budget):
            per_example: list[list[float]] = [[] for _ in self.examples]
            for value, e in zip(values, self._owners, strict=True):
                per_example[e].append(value)
            out.append(choice_scores(self.examples, per_example))
        return out

    @torch.inference_mode()
    def _generate(self, model, names, budget) -> list[Scored]:
        stop = self.entry.get("stop", ["\n"])
        ignore_case = self.entry.get("ignore_case", False)
        new_tokens = self.entry.get("max_new_tokens", 32)
        # As the harness: the context keeps its last max_length - max_new_tokens tokens.
        room = max(self.max_length - new_tokens, 1)
        plan = self._plan(
            "generate",
            budget,
            lambda: generate_plan([self._ids(e["prompt"])[-room:] for e in self.examples],
                                  new_tokens, budget),
        )  # fmt: skip
        answers: list[list[str]] = [[""] * len(plan.prompts) for _ in names]
        device = next(model.parameters()).device
        batches = [
            part
            for batch in plan.batches
            for part in self._parts(
                batch, len(names), len(plan.prompts[batch[0]]) + new_tokens, budget
            )
        ]
        for batch in batches:
            prompts = [plan.prompts[u] for u in batch]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(prompts), width, dtype=torch.long)
            for row, ids in enumerate(prompts):  # left-padded: generation continues at the end
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.repeat(len(names), 1).to(device),
                attention_mask=mask.repeat(len(names), 1).to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                # The loop ends once every row has written a stop string (greedy tokens before
                # it do not depend on when the others stop); the answer is cut there below.
                stopping_criteria=stopping_criteria(self.tokenizer, stop, width),
                **passes.routing(model, names, len(batch)),
            )
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for k in range(len(names)):
                for i, u in enumerate(batch):
                    answers[k][u] = evalsets.cut_at_stop(texts[k * len(batch) + i], stop)
        right = [
            [
                int(
                    evalsets.normalise(answers[k][u], ignore_case)
                    == evalsets.normalise(example["answer"], ignore_case)
                )
                for u, example in zip(plan.where, self.examples, strict=True)
            ]
            for k in range(len(names))
        ]
        return [Scored(mean_metrics({"exact_match": r}), {"exact_match": r}) for r in right]


def stopping_criteria(tokenizer, stop: list[str], prompt_width: int):
    """A row is done once its generated text (its prompt aside) holds a stop string, as the
    harness's criterion reads it: a string that starts in the prompt does not count."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if not stop:
        return StoppingCriteriaList([])

    class GeneratedHoldsStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            done = [any(s in text for s in stop) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([GeneratedHoldsStop()])
