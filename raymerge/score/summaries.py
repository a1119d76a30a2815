"""One eval set's metrics, with standard errors, from its per-example scores.

Metrics per kind (each `M` with `M_stderr` beside it, see `stats`):
- text: `loss` (NLL per token, nats), `perplexity` (exp of it), `bits_per_byte` (the harness's:
  NLL in bits per UTF-8 byte), `tokens`, `examples`;
- choice: `accuracy` (the harness's `acc`: the most likely choice is the answer, the first of
  equals on a tie, as numpy's argmax), `accuracy_norm` (`acc_norm`: log-likelihood divided by
  the choice's length in characters), `examples`;
- generate: `exact_match`, `examples`.

The per-example scores (kept beside the metrics, for paired comparisons) are, per kind: text
`{loglikelihood, tokens, bytes}` per document; choice `{accuracy, accuracy_norm}` (0 or 1) and
`loglikelihoods` (one per choice); generate `{exact_match}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raymerge.score import stats

DIGITS = 6


@dataclass
class Scored:
    """One adapter's scores on one eval set."""

    metrics: dict[str, Any]
    examples: dict[str, list]


def mean_metrics(per_example: dict[str, list[int]]) -> dict[str, Any]:
    """Means of 0/1 (or any) per-example scores, each with the harness's stderr."""
    out: dict[str, Any] = {}
    count = 0
    for name, values in per_example.items():
        count = len(values)
        out[name] = round(sum(values) / max(count, 1), DIGITS)
        out[f"{name}_stderr"] = _rounded(stats.mean_stderr(values))
    out["examples"] = count
    return out


def text_metrics(loglik: list[float], tokens: list[int], size: list[int]) -> dict[str, Any]:
    """A text set's token loss, perplexity and bits per byte, each with its stderr."""
    examples = {"loglikelihood": loglik, "tokens": tokens, "bytes": size}
    total_tokens = sum(tokens)
    loss = -sum(loglik) / max(total_tokens, 1)
    perplexity = math.exp(min(loss, 700))
    bits = -sum(loglik) / max(sum(size), 1) / math.log(2)
    out: dict[str, Any] = {}
    for name, value in (("loss", loss), ("perplexity", perplexity), ("bits_per_byte", bits)):
        out[name] = round(value, DIGITS)
        out[f"{name}_stderr"] = _rounded(stats.stderr_of(name, examples, value))
    out["tokens"] = total_tokens
    out["examples"] = len(loglik)
    return out


def choice_scores(examples: list[dict], loglikelihoods: list[list[float]]) -> Scored:
    """Accuracy and length-normalised accuracy from each choice's log-likelihood."""
    right, right_norm = [], []
    for example, values in zip(examples, loglikelihoods, strict=True):
        lengths = [max(len(choice), 1) for choice in example["choices"]]
        normalised = [v / n for v, n in zip(values, lengths, strict=True)]
        right.append(int(_argmax(values) == example["answer"]))
        right_norm.append(int(_argmax(normalised) == example["answer"]))
    per_example = {"accuracy": right, "accuracy_norm": right_norm}
    rounded = [[round(v, DIGITS) for v in row] for row in loglikelihoods]
    kept = {**per_example, "loglikelihoods": rounded}
    return Scored(mean_metrics(per_example), kept)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _rounded(value: float) -> float | None:
    """A stderr as stored: None where it is unknown (fewer than two examples)."""
    return round(value, DIGITS) if math.isfinite(value) else None
