"""The spec's `evaluate` section: eval sets, lm-eval tasks and the objective.

Example:
    >>> EvaluateSpec.model_validate({"datasets": {"qa": "qa.jsonl"}}).objective_terms()
    [{'metric': 'mean_loss'}]
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from raymerge.sweep.spec.types import AdapterName, FrozenModel, as_grid


class EvalSetSpec(FrozenModel):
    """One eval set: a JSONL file and what kind of examples it holds."""

    path: str = Field(min_length=1)
    """Location of the JSONL file (local path, file:// or s3://)."""
    kind: Literal["text", "choice", "generate"] = "text"
    """text: {"text"} -> loss; choice: {"prompt", "choices", "answer"} -> accuracy;
    generate: {"prompt", "answer"} -> exact match of the greedy continuation."""
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    """generate: tokens generated at most."""
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    """generate: the continuation ends at the first of these."""
    ignore_case: bool = False
    """generate: compare answers without regard to case."""
    target_delimiter: str = " "
    """choice: what comes between the prompt and each choice (lm-evaluation-harness's
    `target_delimiter`, default " "; "" scores prompt + choice as written)."""


class ObjectiveTerm(FrozenModel):
    """One term of the objective: a metric, its weight and its direction."""

    metric: str = Field(min_length=1)
    """SET.METRIC (e.g. qa.accuracy), an lm-eval TASK.METRIC, or mean_loss."""
    weight: float = 1.0
    """The term's weight in the objective's sum."""
    direction: Literal["minimize", "maximize"] | None = None
    """Default: minimize losses and perplexities, maximize the rest."""


Objectives = Annotated[list[str | ObjectiveTerm], BeforeValidator(as_grid)]
"""One metric or a list of them, each a name or an ObjectiveTerm."""


class LmEvalSpec(FrozenModel):
    """lm-evaluation-harness tasks, run on the held model with each merge active
    (`pip install raymerge[lm-eval]`)."""

    tasks: list[str] = Field(min_length=1)
    """The harness's task names (e.g. arc_easy), or your own from `include_path`."""
    num_fewshot: int = Field(default=0, ge=0)
    """Examples shown before each question (the harness's num_fewshot)."""
    limit: int | None = Field(default=None, ge=1)
    """Examples per task (default: all)."""
    include_path: str | None = None
    """A folder of task YAMLs (your own tasks, over local data files)."""
    batch_size: int = Field(default=8, ge=1)
    """Requests per forward pass in the harness."""
    bootstrap_iters: int = Field(default=1000, ge=0)
    """Resamples for the stderr of the metrics the harness bootstraps (0: none)."""


class RacingSpec(FrozenModel):
    """Score the grid's merges in rounds, on growing prefixes of one seeded order of each eval
    set's examples, and stop those that are behind; the rest are scored on everything and
    written. A search's candidates are scored in the same rounds and pruned by `search.pruner`."""

    rule: Literal["bound", "halving"] = "bound"
    """bound: stop a merge when a one-sided test at `confidence` says the k-th best beats it on
    the examples seen; halving: keep the best 1/growth of the merges after each round."""
    first: int = Field(default=32, ge=2)
    """Examples per eval set in the first round."""
    growth: float = Field(default=2.0, gt=1, le=16)
    """Each round's prefix is this many times the last (halving's eta)."""
    confidence: float = Field(default=0.99, gt=0.5, lt=1)
    """bound: the one-sided confidence of each stop."""
    top: int | None = Field(default=None, ge=1)
    """The k of "within the top k" (default: keep.top, else 1)."""
    seed: int | None = None
    """Seeds the order of the examples (default: the sweep's seed)."""
    rescore_stopped: bool = False
    """Score the stopped merges on everything as well (and write them) after the race."""


class EvaluateSpec(FrozenModel):
    """Score every merge on small eval sets with the held base model."""

    datasets: dict[AdapterName, str | EvalSetSpec] = Field(default_factory=dict)
    """Eval set name -> a JSONL location (a text set), or {path, kind, ...}."""
    max_samples: int = Field(default=64, ge=1)
    """Examples scored per eval set."""
    batch_size: int = Field(default=8, ge=1)
    """Rows of max_length per forward pass: a pass holds batch_size x (max_length + 1) tokens
    (shorter rows, more of them), for its adapters_per_pass merges together."""
    max_length: int = Field(default=128, ge=2)
    """Tokens per window (text), per choice row, or per prompt and its generated tokens."""
    adapters_per_pass: int = Field(default=1, ge=1, le=64)
    """Merges scored together through PEFT's mixed-adapter batches (one base pass for all)."""
    objective: Objectives | None = None
    """What "best" means: a metric, or a list of them (weighted sum); default: mean_loss over
    the text sets, else the first set's main metric."""
    normalize: Literal["references", "none"] | None = None
    """A sum of objective terms: "references" (the default) takes each term relative to the
    base model and in units of its spread across the references; "none" adds them as they are.
    One term is never rescaled."""
    lm_eval: LmEvalSpec | None = None
    """lm-evaluation-harness tasks to score each merge on, beside `datasets`."""
    racing: RacingSpec | None = None
    """Stop merges that are clearly behind after part of the examples (default: score every
    merge on everything)."""

    @model_validator(mode="after")
    def _something_to_score(self) -> EvaluateSpec:
        if not self.datasets and self.lm_eval is None:
            raise ValueError("give `datasets`, `lm_eval`, or both")
        if self.racing is not None and (self.lm_eval is not None or not self.datasets):
            raise ValueError(
                "racing scores eval sets (`datasets`) in rounds; lm_eval tasks are scored whole "
                "by the harness: remove `racing` or `lm_eval`"
            )
        if self.lm_eval:
            clash = sorted(set(self.lm_eval.tasks) & set(self.datasets))
            if clash:
                raise ValueError(f"{', '.join(clash)} names both a dataset and an lm_eval task")
        return self

    def sets(self) -> dict[str, EvalSetSpec]:
        """Every dataset as an EvalSetSpec (a bare location is a text set)."""
        return {
            name: EvalSetSpec(path=value) if isinstance(value, str) else value
            for name, value in self.datasets.items()
        }

    def objective_normalize(self) -> str:
        """How the objective's terms are scaled: the spec's choice, else the default."""
        if self.normalize is not None:
            return self.normalize
        return "references" if len(self.objective_terms()) > 1 else "none"

    def objective_terms(self) -> list[dict[str, Any]]:
        """The objective as plain terms, the default filled in."""
        if self.objective:
            return [
                {"metric": t} if isinstance(t, str) else t.model_dump(exclude_none=True)
                for t in self.objective
            ]
        sets = self.sets()
        if any(s.kind == "text" for s in sets.values()):
            return [{"metric": "mean_loss"}]
        if sets:
            name, first = next(iter(sets.items()))
            primary = {"choice": "accuracy", "generate": "exact_match"}[first.kind]
            return [{"metric": f"{name}.{primary}"}]
        return [{"metric": f"{self.lm_eval.tasks[0]}.acc"}]
