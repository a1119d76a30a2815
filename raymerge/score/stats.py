"""Standard errors and paired comparisons of scores, as lm-evaluation-harness computes them.

A mean over examples (accuracy, exact match) has the harness's standard error: the sample
standard deviation of the per-example scores (n - 1 in the denominator) over sqrt(n)
(`lm_eval.api.metrics.mean_stderr`). A ratio of sums (a text set's loss: NLL per token;
bits per byte) is a mean weighted by each document's tokens or bytes; its standard error is the
delta method's over documents (the harness reports none for its weighted perplexities).

Every metric is linear to first order in per-example terms (its *influence*: the example's score
for a mean; `(num_i - ratio x den_i) / mean(den)` for a ratio), and so is the objective, a
weighted sum of metrics. That gives the objective's standard error (eval sets are independent
samples: their variances add), and the standard error of the difference between two merges
scored on the same examples (paired: the per-example differences), from which the 95% interval
and the verdict ("better", "worse", "not distinguishable") follow. An lm-eval task's metric has
no per-example scores here: its own standard error enters, unpaired.

Example:
    >>> round(mean_stderr([1, 0, 1, 1]), 6)
    0.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raymerge.score.objective import MEAN_LOSS, Objective

Z95 = 1.959963984540054
"""The two-sided 95% quantile of the normal distribution."""
RATIOS = {"loss": ("nll", "tokens"), "bits_per_byte": ("bits", "bytes")}
"""A text set's ratio metrics: numerator and denominator per document."""


def mean_stderr(values) -> float:
    """The harness's standard error of a mean: sample std (ddof 1) / sqrt(n); NaN for n < 2."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan
    return float(values.std(ddof=1) / math.sqrt(values.size))


def ratio_influence(numerators, denominators) -> np.ndarray:
    """Per-document influence of sum(num) / sum(den): its sample variance / n is the ratio's
    (delta-method) variance."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if den.sum() <= 0:
        return np.zeros_like(num)
    ratio = num.sum() / den.sum()
    return (num - ratio * den) / den.mean()


def text_columns(examples: dict[str, list]) -> dict[str, np.ndarray]:
    """A text set's per-document sums: NLL (nats), bits, tokens and bytes."""
    ll = np.asarray(examples["loglikelihood"], dtype=np.float64)
    return {
        "nll": -ll,
        "bits": -ll / math.log(2),
        "tokens": np.asarray(examples["tokens"], dtype=np.float64),
        "bytes": np.asarray(examples["bytes"], dtype=np.float64),
    }


def influence(metric: str, examples: dict[str, list], value: float) -> np.ndarray | None:
    """Per-example influence of one set's `metric` (None: not known per example)."""
    if "loglikelihood" in examples:  # a text set
        columns = text_columns(examples)
        if metric in RATIOS:
            num, den = RATIOS[metric]
            return ratio_influence(columns[num], columns[den])
        if metric == "perplexity":  # exp(loss): the delta method again
            return value * ratio_influence(columns["nll"], columns["tokens"])
        return None
    if metric in examples:
        return np.asarray(examples[metric], dtype=np.float64)
    return None


def stderr_of(metric: str, examples: dict[str, list], value: float) -> float:
    """A metric's standard error from its per-example influence."""
    values = influence(metric, examples, value)
    return math.nan if values is None else mean_stderr(values)


@dataclass
class Linear:
    """The objective's first-order form: per eval set, each example's weighted influence
    (`per_set`), plus variance known only in aggregate (lm-eval tasks' stderr, squared)."""

    per_set: dict[str, np.ndarray]
    unpaired: float


def linear_form(objective: Objective, metrics: dict, examples: dict) -> Linear:
    """The objective of one merge (or reference) as per-example terms (see module doc)."""
    per_set: dict[str, np.ndarray] = {}
    unpaired = 0.0
    for metric, coefficient in expanded(objective, metrics):
        name, _, key = metric.rpartition(".")
        value = metrics.get(name, {}).get(key, math.nan)
        per_example = influence(key, examples.get(name, {}), value)
        if per_example is None:
            stderr = metrics.get(name, {}).get(f"{key}_stderr", math.nan)
            unpaired += (coefficient * _number(stderr)) ** 2
            continue
        term = coefficient * per_example
        per_set[name] = per_set[name] + term if name in per_set else term
    return Linear(per_set, unpaired)


def objective_stderr(objective: Objective, metrics: dict, examples: dict) -> float:
    """The objective's standard error (NaN where a term's is unknown)."""
    form = linear_form(objective, metrics, examples)
    variance = form.unpaired + sum(_variance(v) for v in form.per_set.values())
    return math.sqrt(variance) if math.isfinite(variance) else math.nan


@dataclass(frozen=True)
class Comparison:
    """One merge against another on the same examples: the difference of their objectives,
    oriented so that positive means `a` is better, with its 95% interval."""

    difference: float
    stderr: float
    examples: int
    """Examples per eval set of the objective (the largest)."""

    @property
    def low(self) -> float:
        return self.difference - Z95 * self.stderr

    @property
    def high(self) -> float:
        return self.difference + Z95 * self.stderr

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.stderr):
            return "unknown"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "not distinguishable"

    @property
    def examples_needed(self) -> int | None:
        """Roughly how many examples per set would make this difference significant at 95%,
        at the same per-example spread (None: no difference seen, or it is significant)."""
        if self.verdict != "not distinguishable" or self.difference == 0:
            return None
        factor = (Z95 * self.stderr / abs(self.difference)) ** 2
        return math.ceil(self.examples * factor)


def compare(objective: Objective, a: tuple[dict, dict], b: tuple[dict, dict]) -> Comparison:
    """`a` against `b`, each (metrics, per-example values): paired on every eval set where both
    have per-example values for the same number of examples, unpaired elsewhere."""
    form_a, form_b = linear_form(objective, *a), linear_form(objective, *b)
    variance = form_a.unpaired + form_b.unpaired
    sizes = [0]
    for name in form_a.per_set.keys() | form_b.per_set.keys():
        left, right = form_a.per_set.get(name), form_b.per_set.get(name)
        if left is not None and right is not None and left.shape == right.shape:
            variance += _variance(left - right)
            sizes.append(left.size)
        else:
            variance += sum(_variance(v) for v in (left, right) if v is not None)
    sign = 1.0 if objective.direction == "maximize" else -1.0
    difference = sign * (objective.value(a[0]) - objective.value(b[0]))
    stderr = math.sqrt(variance) if math.isfinite(variance) else math.nan
    return Comparison(difference, stderr, max(sizes))


def expanded(objective: Objective, metrics: dict) -> list[tuple[str, float]]:
    """The objective's coefficients with `mean_loss` spread over the text sets' losses."""
    out = []
    for metric, coefficient in objective.coefficients():
        if metric == MEAN_LOSS:
            losses = [name for name, m in metrics.items() if "loss" in m]
            out += [(f"{name}.loss", coefficient / len(losses)) for name in losses]
        else:
            out.append((metric, coefficient))
    return out


def _variance(values: np.ndarray) -> float:
    """The variance of the mean of `values` (NaN for fewer than two)."""
    return math.nan if values.size < 2 else float(values.var(ddof=1) / values.size)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan
