"""Scoring merged adapters on the held base model, many per forward pass.

Up to `adapters_per_pass` merged adapters are loaded into the PeftModel together, from the exact
tensors written (no temporary folder), and every eval set is run once for all of them through
PEFT's mixed-adapter batches: each example appears once per adapter in the batch, and
`adapter_names` routes each row through its adapter (one base-layer pass for all). The metrics
equal those of scoring each adapter alone, to the last bit on a bf16 base too (`passes.routing`:
one adapter alone takes PEFT's plain forward only where it computes the same bits). Each set is
planned once and scored by its kind (`kinds`). Each adapter is held in the
dtype its files hold (`slots`); log-probabilities are computed on the logits' device, in memory
bounded by `logprobs.extra_bytes_bound`. lm-evaluation-harness tasks, if any, run one adapter at
a time (the harness knows no mixed batches).

Examples become token rows by the harness's conventions (`requests`); metrics per eval set, each
with its standard error, are in `summaries`; an lm-eval task gives the harness's own. Every
adapter's per-example scores come back beside its metrics (`Scores`), for paired comparisons.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raymerge.merge.tensors import MergedAdapter
from raymerge.score import evalsets
from raymerge.score.kinds import EvalSet
from raymerge.score.racing import example_order, window_positions
from raymerge.score.slots import Slots, load_reference
from raymerge.task import EvalConfig, Window


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
        self._sets: dict[str, EvalSet] | None = None
        self._harness = None
        self._names = itertools.count()
        self._slots = Slots(base, capacity=4 * config.adapters_per_pass)
        self._window: tuple[Window, dict[str, EvalSet]] | None = None  # the latest window's

    def sets(self) -> dict[str, EvalSet]:
        """The eval sets, read and tokenized once with the base model's tokenizer."""
        if self._sets is None:
            tokenizer = self.tokenizer()
            self._sets = {
                name: EvalSet(
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

    @contextlib.contextmanager
    def active(self, merged: MergedAdapter):
        """The PeftModel with `merged` loaded and active: a plain forward runs it."""
        name = self._slots.load(merged)
        try:
            self.base.peft.set_adapter(name)
            yield self.base.peft
        finally:
            self._slots.release([name])

    def _window_sets(self, window: Window) -> dict[str, EvalSet]:
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
        sets: dict[str, EvalSet] | None = None,
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
                for offset, scored in enumerate(
                    eval_set.score(self._model(), chunk, self.config.batch_size)
                ):
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
