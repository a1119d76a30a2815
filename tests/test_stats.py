"""Error bars and verdicts: each metric's stderr as lm-evaluation-harness computes it, the
objective's stderr, paired comparisons of two merges on the same examples, and objectives whose
terms are normalised by the references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from raymerge.report.verdicts import mark_ties, reference_verdicts
from raymerge.score import stats
from raymerge.score.harness import harness_metrics
from raymerge.score.objective import Objective, scale_warning, spread_warning
from raymerge.score.summaries import mean_metrics, text_metrics

lm_metrics = pytest.importorskip("lm_eval.api.metrics")


def _choice(right: list[int]) -> tuple[dict, dict]:
    """(metrics, per-example scores) of a choice set "qa" answered as `right` says."""
    per_example = {"accuracy": right, "accuracy_norm": right}
    return {"qa": mean_metrics(per_example)}, {"qa": per_example}


@pytest.mark.parametrize("size", [2, 5, 64, 257])
def test_the_stderr_of_a_mean_is_the_harness_s(size):
    rng = random.Random(size)
    right = [rng.randint(0, 1) for _ in range(size - 1)] + [1]
    right[0] = 0  # never all equal
    metrics = mean_metrics({"accuracy": right})
    assert metrics["accuracy_stderr"] == pytest.approx(lm_metrics.mean_stderr(right), abs=1e-6)
    assert metrics["accuracy_stderr"] > 0
    assert metrics["accuracy"] == pytest.approx(sum(right) / size, abs=1e-6)


def test_one_example_has_no_stderr_rather_than_a_made_up_one():
    assert mean_metrics({"exact_match": [1]})["exact_match_stderr"] is None


def test_a_text_set_s_stderr_is_the_delta_method_s_and_agrees_with_a_bootstrap():
    """Loss is a ratio (NLL per token): its stderr is over documents, not tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=200)
    nll = tokens * rng.gamma(4.0, 0.5, size=200)  # documents differ in difficulty
    size = tokens * 3
    metrics = text_metrics((-nll).tolist(), tokens.tolist(), size.tolist())
    assert metrics["loss"] == pytest.approx(nll.sum() / tokens.sum(), abs=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(nll.sum() / size.sum() / math.log(2), abs=1e-6)
    draws = rng.integers(0, 200, size=(4000, 200))
    boot = nll[draws].sum(axis=1) / tokens[draws].sum(axis=1)
    assert metrics["loss_stderr"] == pytest.approx(boot.std(), rel=0.1)


def test_the_objective_s_stderr_adds_independent_sets_and_pairs_terms_on_one_set():
    rng = random.Random(1)
    right = [rng.randint(0, 1) for _ in range(64)]
    metrics, examples = _choice(right)
    one = Objective.parse("qa.accuracy")
    assert stats.objective_stderr(one, metrics, examples) == pytest.approx(
        metrics["qa"]["accuracy_stderr"], abs=1e-6
    )
    # accuracy + accuracy_norm on the same (here identical) examples: perfectly correlated,
    # so the stderr doubles (independent terms would give sqrt(2) times).
    both = Objective.parse(["qa.accuracy", "qa.accuracy_norm"], normalize="none")
    assert stats.objective_stderr(both, metrics, examples) == pytest.approx(
        2 * metrics["qa"]["accuracy_stderr"], abs=1e-6
    )


def test_two_merges_within_noise_are_not_distinguishable_and_far_apart_are():
    rng = random.Random(2)
    base = [int(rng.random() < 0.5) for _ in range(64)]
    close = list(base)
    flips = [i for i, v in enumerate(base) if v == 0][:2]
    for i in flips:  # two more right answers of 64, and one fewer
        close[i] = 1
    close[next(i for i, v in enumerate(base) if v == 1)] = 0
    far = [1 if rng.random() < 0.95 else v for v in base]
    objective = Objective.parse("qa.accuracy")
    near = stats.compare(objective, _choice(close), _choice(base))
    assert near.verdict == "not distinguishable" and near.low < 0 < near.high
    assert near.difference == pytest.approx(1 / 64, abs=1e-6)
    assert near.examples == 64 and near.examples_needed > 64
    clear = stats.compare(objective, _choice(far), _choice(base))
    assert clear.verdict == "better" and clear.low > 0.1
    assert stats.compare(objective, _choice(base), _choice(far)).verdict == "worse"


def test_pairing_is_what_tells_a_small_consistent_gain_from_noise():
    """The same gain of 8 examples in 200, made on examples the other got wrong and nothing
    else changed: paired it is clear; the two merges' own error bars overlap widely."""
    rng = random.Random(3)
    base = [int(rng.random() < 0.5) for _ in range(200)]
    better = list(base)
    for i in [i for i, v in enumerate(base) if v == 0][:8]:
        better[i] = 1
    objective = Objective.parse("qa.accuracy")
    comparison = stats.compare(objective, _choice(better), _choice(base))
    assert comparison.verdict == "better"
    unpaired = math.hypot(*(_choice(r)[0]["qa"]["accuracy_stderr"] for r in (better, base)))
    assert comparison.difference < 1.96 * unpaired  # unpaired it would not be


def test_a_minimised_objective_is_oriented_so_that_better_is_positive():
    objective = Objective.parse("t.loss")
    tokens = [10] * 40
    good = text_metrics([-10.0 - (i % 3) for i in range(40)], tokens, tokens)
    bad = text_metrics([-30.0 - (i % 5) for i in range(40)], tokens, tokens)
    ex = {"loglikelihood": [], "tokens": tokens, "bytes": tokens}

    def scored(metrics, shift):
        return {"t": metrics}, {"t": {**ex, "loglikelihood": [-v for v in shift]}}

    good_s = scored(good, [10.0 + (i % 3) for i in range(40)])
    bad_s = scored(bad, [30.0 + (i % 5) for i in range(40)])
    comparison = stats.compare(objective, good_s, bad_s)
    assert comparison.difference > 0 and comparison.verdict == "better"


def _references() -> dict:
    def scores(accuracy, loss):
        return {"qa": {"accuracy": accuracy}, "t": {"loss": loss}}

    return {"base": scores(0.25, 6.0), "adapters": {"a": scores(0.75, 4.0), "b": scores(0.3, 16)}}


def test_normalised_terms_weigh_what_they_say():
    """Raw, a loss of 4..16 swamps an accuracy of 0..1; normalised by the references' spreads,
    each term counts in units of how much it varies across them."""
    terms = ["qa.accuracy", "t.loss"]
    raw = Objective.parse(terms, normalize="none")
    scaled = Objective.parse(terms).against(_references())
    assert scaled.normalize == "applied" and raw.normalize == "none"
    accurate = {"qa": {"accuracy": 0.75}, "t": {"loss": 5.0}}
    low_loss = {"qa": {"accuracy": 0.25}, "t": {"loss": 4.0}}
    assert raw.better(raw.value(low_loss), raw.value(accurate))  # the loss decides alone
    assert scaled.better(scaled.value(accurate), scaled.value(low_loss))
    assert scaled.value(_references()["base"]) == pytest.approx(0.0)
    # accuracy: (0.75 - 0.25) / 0.5 = 1; loss: -(5 - 6) / 12
    assert scaled.value(accurate) == pytest.approx(1 + 1 / 12)
    assert scale_warning(raw) is not None and scale_warning(scaled) is None
    assert "t.loss" in spread_warning(raw, _references())
    assert spread_warning(scaled, _references()) is None
    single = Objective.parse("t.loss")  # one term keeps its own units
    assert single.against(_references()).value(accurate) == 5.0


def test_the_verdict_and_ties_on_a_leaderboard():
    rng = random.Random(4)
    base = [int(rng.random() < 0.3) for _ in range(64)]
    top = [1 if rng.random() < 0.8 else 0 for _ in range(64)]
    near_top = list(top)
    near_top[top.index(1)] = 0
    objective = Objective.parse("qa.accuracy")
    records = {}
    for merge_id, right in (("a" * 16, top), ("b" * 16, near_top), ("c" * 16, base)):
        metrics, examples = _choice(right)
        records[merge_id] = {"merge_id": merge_id, "metrics": metrics, "examples": examples}
    rows = [{"merge_id": m} for m in records]
    mark_ties(rows, records, objective)
    assert [row["tied"] for row in rows] == [True, True, False]
    assert rows[0]["objective_stderr"] > 0
    metrics, examples = _choice(base)
    references = {
        "base": metrics,
        "adapters": {"near": _choice(near_top)[0]},
        "examples": {"base": examples, "adapters": {"near": _choice(near_top)[1]}},
    }
    verdicts = reference_verdicts(objective, records["a" * 16], references)
    assert [v["verdict"] for v in verdicts] == ["better", "not distinguishable"]
    assert "not distinguishable with 64 examples per set" in verdicts[1]["text"]
    assert "examples per set would tell them apart" in verdicts[1]["text"]


def test_the_harness_s_stderr_is_kept_and_its_n_a_is_none():
    results = {"task": {"acc,none": 0.5, "acc_stderr,none": 0.1, "ppl_stderr,none": "N/A"}}
    assert harness_metrics(results) == {"task": {"acc": 0.5, "acc_stderr": 0.1, "ppl_stderr": None}}
