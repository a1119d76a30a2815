"""What a scoring pass runs, counted at the model's input: each distinct request once, a choice
set's prompt once per merge (its choices continue from the prompt's cache), and each example's
score put back in the set's order, equal to the score it gets where it appears only once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import demo_merge_spec, write_spec

from raymerge.cluster.worker import MergeWorker
from raymerge.score.plan import choice_plan
from raymerge.sweep.plan import load_plan


def _lines(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


class _Tokens:
    """Tokens the base model computes, padding aside, counted at its forward (padding is set
    to a token no row holds)."""

    def __init__(self, model, pad_id: int):
        self.count = 0
        self.pad_id = pad_id
        self._handle = model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        self.count += int((kwargs["input_ids"] != self.pad_id).sum())

    def close(self) -> int:
        self._handle.remove()
        return self.count


def _scores(
    demo_dir: Path, folder: Path, sets: dict[str, list[dict]], kinds: dict, per_pass=1, window=None
):
    """Per-example scores of `per_pass` merges of sums and upper on `sets` (scored in one
    pass), how many tokens the model computed, and the worker (closed). `window`: a sliding
    window in the base model's config (which Llama ignores)."""
    folder.mkdir()
    datasets = {}
    for name, examples in sets.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(example) + "\n" for example in examples))
        datasets[name] = {"path": str(path), "kind": kinds[name]}
    evaluate = {"datasets": datasets, "batch_size": 4, "max_length": 32,
                "adapters_per_pass": per_pass}  # fmt: skip
    weights = [[0.6, 0.8], [0.9, 0.2], [0.3, 0.3]][:per_pass]
    spec = demo_merge_spec(demo_dir, folder / "out", weights, evaluate, ("sums", "upper"))
    plan = load_plan(write_spec(folder, spec))
    worker = MergeWorker(0, plan.worker_config())
    worker.base.model.config.sliding_window = window
    merged = [worker.merger.merge(t, worker.merger.inputs(t.adapters)) for t in plan.tasks()]
    sets = worker.scorer.sets()
    used = {t for eval_set in sets.values() for ids, _ in eval_set.rows() for t in ids}
    pad_id = min(set(range(len(used) + 1)) - used)
    for eval_set in sets.values():
        eval_set.pad_id = pad_id  # padding is masked: any token does
    counter = _Tokens(worker.base.model, pad_id)
    scores = worker.scorer.score_merged(merged)
    tokens = counter.close()
    worker.close()
    return [s.examples for s in scores], tokens, worker


def test_a_repeated_example_is_run_once_and_scored_as_where_it_appears_once(demo_dir, tmp_path):
    """The same 10 choice questions and 10 texts, once and twice over: the model computes the
    same tokens either way, each copy's scores equal the single one's exactly, in set order."""
    choice = _lines(demo_dir / "eval" / "upper_choice.jsonl", 10)
    text = _lines(demo_dir / "eval" / "sums.jsonl", 10)
    kinds = {"qa": "choice", "lm": "text"}
    [once], tokens_once, _ = _scores(demo_dir, tmp_path / "once", {"qa": choice, "lm": text},
                                     kinds)  # fmt: skip
    [twice], tokens_twice, _ = _scores(
        demo_dir, tmp_path / "twice", {"qa": choice * 2, "lm": text * 2}, kinds
    )
    assert tokens_once == tokens_twice > 0
    for name in ("qa", "lm"):
        for key, values in once[name].items():
            assert twice[name][key] == values * 2, (name, key)


@pytest.mark.parametrize("per_pass", [1, 3])
def test_a_choice_sets_prompt_is_computed_once_per_merge(demo_dir, tmp_path, per_pass):
    """20 questions of 4 choices, `per_pass` merges in one pass: the model computes, per merge,
    each prompt once and each choice's tokens but its last, far fewer than the rows hold (each
    prompt again with every choice, as the harness computes them)."""
    questions = _lines(demo_dir / "eval" / "upper_choice.jsonl", 20)
    _, tokens, worker = _scores(demo_dir, tmp_path / "qa", {"qa": questions}, {"qa": "choice"},
                                per_pass)  # fmt: skip
    rows = worker.scorer.sets()["qa"].rows()
    plan = choice_plan(rows, budget=4 * 33)
    prompts = sum(map(len, plan.contexts))
    assert len(plan.contexts) == 20 and len(plan.continuations) == 80
    assert tokens == per_pass * plan.tokens()
    assert plan.tokens() == prompts + sum(len(c) - 1 for c in plan.continuations)
    # Each prompt again with each choice would compute 3 more copies of every prompt.
    assert sum(len(ids) for ids, _ in rows) - plan.tokens() >= 3 * prompts


def test_a_model_whose_rows_cannot_share_a_context_scores_choices_whole_and_alike(
    demo_dir, tmp_path
):
    """A sliding window in the config (which a row's own mask would override): each
    (question, choice) row runs whole, as the harness runs it, and scores as the shared rows
    do, to float32 rounding; the decisions are the same."""
    questions = _lines(demo_dir / "eval" / "upper_choice.jsonl", 20)
    [shared], shared_tokens, _ = _scores(demo_dir, tmp_path / "a", {"qa": questions},
                                         {"qa": "choice"})  # fmt: skip
    [whole], whole_tokens, _ = _scores(demo_dir, tmp_path / "b", {"qa": questions},
                                       {"qa": "choice"}, window=4096)  # fmt: skip
    assert whole_tokens > 1.5 * shared_tokens  # each prompt again with every choice
    assert whole["qa"]["accuracy"] == shared["qa"]["accuracy"]
    assert whole["qa"]["accuracy_norm"] == shared["qa"]["accuracy_norm"]
    for a, b in zip(whole["qa"]["loglikelihoods"], shared["qa"]["loglikelihoods"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_a_long_generation_prompt_keeps_its_last_max_length_minus_new_tokens(demo_dir, tmp_path):
    """As the harness's generate_until: a prompt longer than max_length (32) - max_new_tokens
    (8) is generated from its last 24 tokens; a repeated prompt is generated once."""
    [item] = _lines(demo_dir / "eval" / "sums_gen.jsonl", 1)
    long = {"prompt": "1+1=2 " * 40 + item["prompt"], "answer": item["answer"]}
    folder = tmp_path / "gen"
    folder.mkdir()
    path = folder / "gen.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (long, item, long)))
    datasets = {"gen": {"path": str(path), "kind": "generate", "max_new_tokens": 8}}
    evaluate = {"datasets": datasets, "batch_size": 4, "max_length": 32}
    spec = demo_merge_spec(demo_dir, folder / "out", [[0.6, 0.8]], evaluate, ("sums", "upper"))
    plan = load_plan(write_spec(folder, spec))
    worker = MergeWorker(0, plan.worker_config())
    [merged] = [worker.merger.merge(t, worker.merger.inputs(t.adapters)) for t in plan.tasks()]
    first_pass = []
    handle = worker.base.model.register_forward_pre_hook(
        lambda module, args, kwargs: first_pass.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    [scores] = worker.scorer.score_merged([merged])
    handle.remove()
    worker.close()
    assert first_pass[0] == (2, 24)  # two distinct prompts, the long one cut to 24 tokens
    assert scores.examples["gen"]["exact_match"][0] == scores.examples["gen"]["exact_match"][2]


def test_a_stop_string_counts_only_in_the_generated_text(demo_dir):
    """As the harness's criterion: a stop string that starts in the prompt does not end a row;
    one the generated text holds does."""
    import torch
    from transformers import AutoTokenizer

    from raymerge.score.kinds import stopping_criteria

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "world" / "base")
    prompt = tokenizer("Add 2 and 2.\n")["input_ids"]
    stop = stopping_criteria(tokenizer, ["\n\n"], len(prompt))
    across = tokenizer("\n4", add_special_tokens=False)["input_ids"]  # "\n" + "\n4"
    inside = tokenizer("\n4\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt).endswith("\n") and tokenizer.decode(across).startswith("\n")
    assert not bool(stop(torch.tensor([prompt + across]), None)[0])
    assert bool(stop(torch.tensor([prompt + inside]), None)[0])


def test_a_model_with_alibi_scores_choices_as_whole_rows():
    """ALiBi takes its distances from the attention mask, not from position ids: a row holding
    a context and its choices would be scored at the wrong distances."""
    from transformers import FalconConfig, FalconForCausalLM

    from raymerge.score import passes

    shape = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    assert not passes.shares_contexts(FalconForCausalLM(FalconConfig(alibi=True, **shape)))
    assert passes.shares_contexts(FalconForCausalLM(FalconConfig(alibi=False, **shape)))
