"""Eval set kinds (text, choice, generate), many merges per forward pass, the objective, bad eval
files, and lm-evaluation-harness tasks defined offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_spec
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.cluster.worker import MergeWorker
from raymerge.sweep.plan import load_plan

ADAPTERS = ("sums", "reverse", "upper")


def _spec(demo_dir: Path, output: Path, **evaluate) -> dict:
    datasets = {
        "sums": str(demo_dir / "eval" / "sums.jsonl"),
        "upper_choice": {"path": str(demo_dir / "eval" / "upper_choice.jsonl"), "kind": "choice"},
        "sums_gen": {
            "path": str(demo_dir / "eval" / "sums_gen.jsonl"),
            "kind": "generate",
            "max_new_tokens": 4,
        },
    }
    return {
        "base_model": str(demo_dir / "world" / "base"),
        "adapters": {t: str(demo_dir / "world" / "adapters" / t) for t in ADAPTERS},
        "combinations": [
            {
                "choose": 2,
                "weights": [[0.5, 0.5], [0.9, 0.1]],
                "methods": [{"combination_type": ["cat", "svd"]}],
            }
        ],
        "output": str(output),
        "workers": 1,
        "evaluate": {
            "datasets": datasets,
            "max_samples": 64,
            "batch_size": 8,
            "max_length": 32,
            **evaluate,
        },
    }


@pytest.fixture(scope="module")
def references(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    plan = load_plan(write_spec(root, _spec(demo_dir, root / "out")))
    worker = MergeWorker(0, plan.worker_config())
    return worker.score_references(list(ADAPTERS))


def test_a_choice_set_rewards_the_adapter_that_has_the_skill(references):
    """Upper-casing as multiple choice: the upper adapter picks the upper-cased word far more
    often than the base model (chance is 1 in 4) or the adapters of other skills (measured:
    0.78 against the base's 0.19 and at most 0.23 for the others, 64 examples)."""
    accuracy = {n: s["upper_choice"]["accuracy"] for n, s in references["adapters"].items()}
    base = references["base"]["upper_choice"]["accuracy"]
    assert accuracy["upper"] >= 0.6 and accuracy["upper"] >= base + 0.3, (accuracy, base)
    assert accuracy["upper"] >= max(accuracy["sums"], accuracy["reverse"]) + 0.3
    for scores in (references["base"], *references["adapters"].values()):
        choice = scores["upper_choice"]
        assert choice["examples"] == 64 and 0 <= choice["accuracy_norm"] <= 1


def test_a_generate_set_rewards_exact_answers(references):
    """Only the sums adapter answers sums exactly (measured: all 64; asked: 3 in 4)."""
    exact = {n: s["sums_gen"]["exact_match"] for n, s in references["adapters"].items()}
    assert references["base"]["sums_gen"]["exact_match"] == 0.0
    assert references["base"]["sums_gen"]["examples"] == 64
    assert exact["sums"] >= 0.75 and exact["upper"] == exact["reverse"] == 0.0


def test_text_sets_still_report_loss_and_perplexity(references):
    """The sums adapter's loss on sums texts (measured 0.74) far under the base's (5.52)."""
    sums = references["adapters"]["sums"]["sums"]
    assert sums["loss"] < references["base"]["sums"]["loss"] - 3.0
    assert sums["perplexity"] == pytest.approx(2.718281828 ** sums["loss"], rel=1e-5)


def test_many_merges_per_pass_score_as_one_at_a_time(demo_dir, tmp_path):
    """Four merges through one mixed-adapter batch equal four passes of one, every kind."""
    metrics = {}
    for per_pass in (1, 4):
        spec = _spec(demo_dir, tmp_path / f"k{per_pass}", adapters_per_pass=per_pass)
        plan = load_plan(write_spec(tmp_path, spec, f"k{per_pass}.yaml"))
        tasks = list(plan.tasks())[:4]
        results = MergeWorker(0, plan.worker_config()).merge_many(tasks, [0] * 4)
        assert all(r.done for r in results), [r.error for r in results]
        metrics[per_pass] = [r.record["metrics"] for r in results]
    for one, together in zip(metrics[1], metrics[4], strict=True):
        assert one.keys() == together.keys() == {"sums", "upper_choice", "sums_gen"}
        assert one["sums"]["loss"] == pytest.approx(together["sums"]["loss"], rel=1e-5, abs=1e-6)
        assert one["upper_choice"] == together["upper_choice"]
        assert one["sums_gen"] == together["sums_gen"]
    assert len({json.dumps(m, sort_keys=True) for m in metrics[4]}) == 4  # distinct merges


BAD_LINES = {
    "not JSON": ("choice", "{prompt: 1", "line 2: not valid JSON"),
    "missing field": ("choice", '{"prompt": "a:", "choices": ["A", "a"]}', '"answer" must be'),
    "answer out of range": (
        "choice",
        '{"prompt": "a:", "choices": ["A", "a"], "answer": 2}',
        '"answer" 2 is out of range for 2 choices',
    ),
    "generate without answer": ("generate", '{"prompt": "1+1="}', 'no "answer" string'),
    "text without text": ("text", '{"txt": "hello"}', 'no "text" string'),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_eval_file_names_file_and_line(demo_dir, tmp_path, case):
    kind, bad, expected = BAD_LINES[case]
    good = {
        "choice": '{"prompt": "b:", "choices": ["B", "b"], "answer": 0}',
        "generate": '{"prompt": "1+1=", "answer": "2"}',
        "text": '{"text": "1+1=2"}',
    }[kind]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{bad}\n")
    spec = _spec(demo_dir, tmp_path / "out")
    spec["evaluate"]["datasets"]["broken"] = {"path": str(path), "kind": kind}
    result = CliRunner().invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2, result.output
    assert f"evaluate.datasets.broken ({path}) line 2" in result.output
    assert expected in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ("nowhere.loss", "'nowhere.loss' names no eval set or lm_eval task"),
        ("upper_choice.loss", "a choice set reports accuracy, accuracy_norm"),
    ],
)
def test_an_objective_naming_what_is_not_scored_is_refused(demo_dir, tmp_path, objective, expected):
    spec = _spec(demo_dir, tmp_path / "out", objective=objective)
    result = CliRunner().invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2 and expected in result.output, result.output


LM_EVAL_TASK = """task: upper_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""

requires_lm_eval = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("lm_eval"),
    reason="lm-evaluation-harness is not installed (pip install 'raymerge[lm-eval]')",
)


@requires_lm_eval
def test_an_lm_eval_task_defined_offline_scores_each_merge(demo_dir, tmp_path):
    """A custom harness task (local YAML over a local JSON file) run on the held model with
    each merge active: the upper adapter's accuracy beats the base model's, as with our own
    choice set over the same data."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = demo_dir / "eval" / "upper_choice.jsonl"
    (tasks / "upper_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    spec = _spec(demo_dir, tmp_path / "out")
    spec["evaluate"]["lm_eval"] = {"tasks": ["upper_mc"], "include_path": str(tasks), "limit": 32}
    spec["evaluate"]["objective"] = "upper_mc.acc"
    plan = load_plan(write_spec(tmp_path, spec))
    worker = MergeWorker(0, plan.worker_config())
    references = worker.score_references(list(ADAPTERS))
    base = references["base"]["upper_mc"]["acc"]
    upper = references["adapters"]["upper"]["upper_mc"]["acc"]
    assert upper >= base + 0.15, (upper, base)
    [result] = worker.merge_many(list(plan.tasks())[:1], [0])
    assert result.done and 0 <= result.record["metrics"]["upper_mc"]["acc"] <= 1


HUB_TASK = """task: hub_mc
dataset_path: Rowan/hellaswag
test_split: validation
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: label
metadata: {version: 1.0}
"""
"""A task whose data lives on the Hugging Face hub (hellaswag's dataset), defined locally so
that lm-eval does not index its thousands of own tasks first."""


@requires_lm_eval
def test_an_lm_eval_task_that_needs_the_hub_fails_clearly_offline(demo_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_mc.yaml").write_text(HUB_TASK)
    code = (
        "from raymerge.score.harness import Harness\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(demo_dir / 'world' / 'base')!r})\n"
        f"Harness({{'tasks': ['hub_mc'], 'include_path': {str(tasks)!r}, 'batch_size': 4}}, tok)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode != 0
    assert "needs data from the Hugging Face hub, which cannot be reached" in result.stderr
