"""lm-evaluation-harness's side of the comparisons with raymerge's scores: local task YAMLs
over JSONL files (one per kind, `raymerge.bench.harness_tasks`, which the bench uses too) and
where per-example results differ."""

from __future__ import annotations

import pytest

from raymerge.bench.harness_tasks import CHOICE_TASK, GENERATE_TASK, TEXT_TASK, task_yaml

__all__ = ["CHOICE_TASK", "GENERATE_TASK", "TEXT_TASK", "task_yaml"]


def lls(sample) -> list[float]:
    return [float(ll) for ll, _ in sample["filtered_resps"]]


def choice_mismatches(ours_entry, harness_entry, tol=1e-4) -> list[str]:
    """Where our per-example choice scores and the harness's per-sample ones differ."""
    examples = ours_entry
    samples = harness_entry["samples"]
    problems = []
    if len(examples["accuracy"]) != len(samples):
        return [f"{len(examples['accuracy'])} examples scored, the harness has {len(samples)}"]
    for i, sample in enumerate(samples):
        theirs = lls(sample)
        mine = examples["loglikelihoods"][i]
        if len(mine) != len(theirs) or any(
            abs(a - b) > tol for a, b in zip(mine, theirs, strict=True)
        ):
            problems.append(f"example {i} {sample['arguments']}: ours {mine}, harness {theirs}")
        for key, metric in (("accuracy", "acc"), ("accuracy_norm", "acc_norm")):
            if examples[key][i] != sample[metric]:
                problems.append(
                    f"example {i} {key}: ours {examples[key][i]}, harness {sample[metric]}"
                )
    return problems


def text_mismatches(ours_entry, harness_entry, tol=1e-3) -> list[str]:
    examples = ours_entry
    samples = harness_entry["samples"]
    problems = []
    if len(examples["loglikelihood"]) != len(samples):
        return [
            f"{len(examples['loglikelihood'])} documents scored, the harness has {len(samples)}"
        ]
    for i, sample in enumerate(samples):
        ll, size = sample["bits_per_byte"]
        text = sample["target"]
        if abs(examples["loglikelihood"][i] - ll) > tol:
            problems.append(
                f"document {i} {text!r}: ours {examples['loglikelihood'][i]}, harness {ll}"
            )
        if examples["bytes"][i] != size:
            problems.append(f"document {i} bytes: ours {examples['bytes'][i]}, harness {size}")
        tokens = harness_entry["tokens"][i]
        if examples["tokens"][i] != tokens:
            problems.append(f"document {i} tokens: ours {examples['tokens'][i]}, harness {tokens}")
    return problems


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def assert_choice_metrics(metrics: dict, harness_entry: dict) -> None:
    """Accuracy, accuracy_norm and their stderrs are the harness's acc, acc_norm and theirs."""
    results = harness_entry["results"]
    assert metrics["examples"] == len(harness_entry["samples"])
    for ours_name, theirs_name in (("accuracy", "acc"), ("accuracy_norm", "acc_norm")):
        assert metrics[ours_name] == pytest.approx(results[f"{theirs_name},none"], abs=1e-6)
        assert metrics[f"{ours_name}_stderr"] == pytest.approx(
            results[f"{theirs_name}_stderr,none"], abs=1e-6
        )
