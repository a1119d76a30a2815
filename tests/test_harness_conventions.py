"""Our choice and text scores are lm-evaluation-harness's, computed by the harness itself.

A tiny world with a trained byte-level BPE tokenizer (so that " cat" is one token and "cat" two,
and the tokenizer adds BOS, as Llama's do) and three random LoRA adapters; the same JSONL files
scored by raymerge (`score_references`) and by the harness (`HFLM` over the same model, local
task YAMLs of `output_type: multiple_choice` and `loglikelihood_rolling`, `evaluate` with
`log_samples`), for the base model and each adapter. Per example, the decisions are equal
exactly and the log-likelihoods to float error; so are accuracy, accuracy_norm, their stderr and
bits per byte. Prompts end in words, spaces and newlines, some are longer than `max_length`, and
documents span several rolling windows.
"""

from __future__ import annotations

import json

import pytest
from bpe_world import build_bpe_world, write_jsonl
from harness_tasks import (
    CHOICE_TASK,
    TEXT_TASK,
    assert_choice_metrics,
    choice_mismatches,
    encode,
    text_mismatches,
)
from helpers import write_spec

pytest.importorskip("lm_eval")

from raymerge.cluster.worker import MergeWorker
from raymerge.sweep.plan import load_plan

ADAPTERS = ("a", "b", "c")
MODELS = ("base", *ADAPTERS)
MAX_LENGTH = 16
"""Both sides' max_length: shorter than the long prompts and most documents."""

CORNERS = {
    "empty prompt": ("edge_mc", {"prompt": "", "choices": ["cat", "dog", "zebra"], "answer": 0}),
    "white-space prompt": ("edge_mc", {"prompt": " ", "choices": ["red", "blue"], "answer": 1}),
    "newline prompt": ("edge_mc", {"prompt": "\n", "choices": ["sheep", "okapi"], "answer": 0}),
    "prompt starting with BOS's text": (
        "edge_mc",
        {"prompt": "<s>the cat sat on", "choices": ["a", "the", "one"], "answer": 1},
    ),
    "document starting with BOS's text": (
        "edge_txt",
        {"text": "<s>the cat sat on the old mat and the dog ran"},
    ),
    "one-word document": ("edge_txt", {"text": "cat"}),
    "document with a leading space": ("edge_txt", {"text": " the cow"}),
}
"""Corners of the harness's request building, each one example of a small set: an empty
context (the harness conditions on the prefix token alone and encodes the continuation without
special tokens), a context of white space alone (it all moves to the continuation; the context
is what `tok_encode("")` gives: BOS here), and a text that starts with BOS's own text
(`tok_encode` then adds no special tokens)."""
EDGE_SETS = {
    name: [example for set_name, example in CORNERS.values() if set_name == name]
    for name in ("edge_mc", "edge_txt")
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-world")
    world = build_bpe_world(root, ADAPTERS)
    edge_choice = write_jsonl(root / "edge_choice.jsonl", EDGE_SETS["edge_mc"])
    edge_text = write_jsonl(root / "edge_text.jsonl", EDGE_SETS["edge_txt"])
    return {
        "world": world,
        "root": root,
        # set name -> (kind, file, target_delimiter or None for the default)
        "sets": {
            "mc": ("choice", world.choice_path, None),
            "mc_nodelim": ("choice", world.choice_path, ""),
            "txt": ("text", world.text_path, None),
            "edge_mc": ("choice", edge_choice, None),
            "edge_txt": ("text", edge_text, None),
        },
    }


@pytest.fixture(scope="module")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world["world"].base)


def _harness_tasks(world) -> dict:
    from lm_eval.tasks import TaskManager

    folder = world["root"] / "tasks"
    folder.mkdir()
    cache = world["root"] / "datasets-cache"
    for name, (kind, path, delimiter) in world["sets"].items():
        if kind == "choice":
            extra = "" if delimiter is None else f"target_delimiter: {json.dumps(delimiter)}\n"
            text = CHOICE_TASK.format(name=name, data=path, cache=cache, extra=extra)
        else:
            text = TEXT_TASK.format(name=name, data=path, cache=cache)
        (folder / f"{name}.yaml").write_text(text)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load(list(world["sets"]))


def _harness_model(world, name: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["world"].base)
    if name != "base":
        model = PeftModel.from_pretrained(model, world["world"].adapters[name])
    return model.eval()


@pytest.fixture(scope="module")
def harness(world, tokenizer):
    """{model: {task: {"results": the task's results, "samples": per-sample records}}}."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISABLE_MULTIPROC", "1")  # no process pool for bootstrapped stderrs
        tasks = _harness_tasks(world)
        for name in MODELS:
            lm = HFLM(
                pretrained=_harness_model(world, name),
                tokenizer=tokenizer,
                batch_size=4,
                max_length=MAX_LENGTH,
                device="cpu",
            )
            output = evaluate(lm, tasks, bootstrap_iters=1000, log_samples=True)
            out[name] = {}
            for task, (kind, _, _) in world["sets"].items():
                samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
                out[name][task] = {"results": output["results"][task], "samples": samples}
                if kind == "text":  # each of a document's tokens is scored once
                    tokens = [len(lm.tok_encode(s["target"])) for s in samples]
                    out[name][task]["tokens"] = tokens
    return out


def _spec(world, output, adapters_per_pass: int) -> dict:
    datasets = {}
    for name, (kind, path, delimiter) in world["sets"].items():
        datasets[name] = {"path": str(path), "kind": kind}
        if delimiter is not None:
            datasets[name]["target_delimiter"] = delimiter
    return {
        "base_model": str(world["world"].base),
        "adapters": {name: str(path) for name, path in world["world"].adapters.items()},
        "combinations": [
            {
                "adapters": ["a", "b"],
                "weights": [[0.5, 0.5]],
                "methods": [{"combination_type": "cat"}],
            }
        ],
        "output": str(output),
        "workers": 1,
        "evaluate": {
            "datasets": datasets,
            "max_samples": 64,
            "batch_size": 4,
            "max_length": MAX_LENGTH,
            "adapters_per_pass": adapters_per_pass,
        },
    }


def _references(world, adapters_per_pass: int) -> dict:
    root = world["root"] / f"k{adapters_per_pass}"
    plan = load_plan(write_spec(root, _spec(world, root / "out", adapters_per_pass)))
    return MergeWorker(0, plan.worker_config()).score_references(list(ADAPTERS))


@pytest.fixture(scope="module")
def ours(world):
    """raymerge's references, one adapter per pass: {model: (metrics, per-example) per set}."""
    return _by_model(_references(world, 1))


@pytest.fixture(scope="module")
def ours_k3(world):
    """The same with three adapters per forward pass."""
    return _by_model(_references(world, 3))


def _by_model(references: dict) -> dict:
    examples = references["examples"]
    out = {"base": (references["base"], examples["base"])}
    for name in ADAPTERS:
        out[name] = (references["adapters"][name], examples["adapters"][name])
    return out


def test_the_tokenizer_has_leading_space_tokens(tokenizer):
    """The point of this world: a word after a space is another token than the word alone, and
    the tokenizer adds BOS by default."""
    assert tokenizer.tokenize(" cat") == ["Ġcat"]
    assert tokenizer.tokenize("cat") != ["Ġcat"]
    assert tokenizer(" cat")["input_ids"] != tokenizer("cat")["input_ids"]
    assert tokenizer("cat")["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize("model", MODELS)
def test_choice_scores_are_the_harness_multiple_choice(ours, harness, model):
    metrics, examples = ours[model]
    theirs = harness[model]["mc"]
    problems = choice_mismatches(examples["mc"], theirs)
    assert not problems, "\n".join(problems)
    assert_choice_metrics(metrics["mc"], theirs)


@pytest.mark.parametrize("model", MODELS)
def test_an_empty_target_delimiter_is_the_harness_one(ours, harness, model):
    metrics, examples = ours[model]
    theirs = harness[model]["mc_nodelim"]
    problems = choice_mismatches(examples["mc_nodelim"], theirs)
    assert not problems, "\n".join(problems)
    assert_choice_metrics(metrics["mc_nodelim"], theirs)


def test_three_adapters_per_pass_score_as_one(ours, ours_k3, harness):
    """Mixed-adapter batches change nothing: the same decisions, the same log-likelihoods (to
    float error), the same metrics, and so again the harness's."""
    for model in MODELS:
        one, three = ours[model], ours_k3[model]
        for name in ("mc", "mc_nodelim", "edge_mc"):
            assert one[0][name] == three[0][name], (model, name)
            assert one[1][name]["accuracy"] == three[1][name]["accuracy"]
            assert one[1][name]["accuracy_norm"] == three[1][name]["accuracy_norm"]
            pairs = zip(
                one[1][name]["loglikelihoods"], three[1][name]["loglikelihoods"], strict=True
            )
            for a, b in pairs:
                assert a == pytest.approx(b, abs=1e-5), (model, name)
        for name in ("txt", "edge_txt"):
            assert three[1][name]["loglikelihood"] == pytest.approx(
                one[1][name]["loglikelihood"], abs=1e-4
            )
            assert three[0][name]["bits_per_byte"] == pytest.approx(
                one[0][name]["bits_per_byte"], rel=1e-6
            )
        problems = choice_mismatches(three[1]["mc"], harness[model]["mc"])
        assert not problems, "\n".join([model, *problems])


def test_the_conventions_matter_on_this_world(ours, harness, tokenizer, world):
    """A guard: with another delimiter, other models or without moving the prompt's trailing
    white space the scores would differ, so that agreeing with the harness means something."""
    # The delimiter changes log-likelihoods (nearly all) and some decisions.
    for model in MODELS:
        spaced = [ll for row in ours[model][1]["mc"]["loglikelihoods"] for ll in row]
        bare = [ll for row in ours[model][1]["mc_nodelim"]["loglikelihoods"] for ll in row]
        assert sum(abs(a - b) > 0.1 for a, b in zip(spaced, bare, strict=True)) > len(bare) // 2
    assert any(
        ours[m][1]["mc"]["accuracy"] != ours[m][1]["mc_nodelim"]["accuracy"] for m in MODELS
    ), "no model decides differently with and without the delimiter"
    # The adapters change log-likelihoods and decisions.
    base = ours["base"][1]["mc"]
    for name in ADAPTERS:
        adapted = ours[name][1]["mc"]
        diffs = [
            abs(a - b)
            for row_a, row_b in zip(adapted["loglikelihoods"], base["loglikelihoods"], strict=True)
            for a, b in zip(row_a, row_b, strict=True)
        ]
        assert max(diffs) > 0.5, name
    assert len({json.dumps(ours[m][1]["mc"]["accuracy"]) for m in MODELS}) > 1
    # accuracy_norm is not accuracy here (choices of different lengths).
    assert any(ours[m][1]["mc"]["accuracy"] != ours[m][1]["mc"]["accuracy_norm"] for m in MODELS)
    # Moving a prompt's trailing white space into the continuation changes the tokens scored:
    # " " then "red" after "... cat " is "Ġ", "Ġred" moved, "Ġred" alone in place.
    choices = [json.loads(line) for line in world["world"].choice_path.read_text().splitlines()]
    spaced = [e for e in choices if e["prompt"] != e["prompt"].rstrip()]
    assert len(spaced) >= 6
    for example in spaced:
        prompt, continuation = example["prompt"], " " + example["choices"][0]
        context = prompt.rstrip()
        moved = encode(tokenizer, prompt + continuation)[len(encode(tokenizer, context)) :]
        in_place = encode(tokenizer, prompt + continuation)[len(encode(tokenizer, prompt)) :]
        assert moved != in_place, example
    # Some prompts are longer than max_length (left truncation) and documents roll over windows.
    assert sum(len(encode(tokenizer, e["prompt"])) > MAX_LENGTH for e in choices) >= 3
    texts = [s["target"] for s in harness["base"]["txt"]["samples"]]
    assert sum(len(encode(tokenizer, t)) > 2 * MAX_LENGTH for t in texts) >= 3


@pytest.mark.parametrize("model", MODELS)
def test_text_scores_are_the_harness_rolling_loglikelihood(ours, harness, model):
    metrics, examples = ours[model]
    theirs = harness[model]["txt"]
    problems = text_mismatches(examples["txt"], theirs)
    assert not problems, "\n".join(problems)
    bits = theirs["results"]["bits_per_byte,none"]
    assert metrics["txt"]["bits_per_byte"] == pytest.approx(bits, rel=1e-5)
    byte_perplexity = theirs["results"]["byte_perplexity,none"]
    assert 2 ** metrics["txt"]["bits_per_byte"] == pytest.approx(byte_perplexity, rel=1e-5)
    loss = -sum(examples["txt"]["loglikelihood"]) / sum(examples["txt"]["tokens"])
    assert metrics["txt"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["txt"]["tokens"] == sum(examples["txt"]["tokens"])
    assert metrics["txt"]["examples"] == len(theirs["samples"])


@pytest.mark.parametrize("corner", sorted(CORNERS))
def test_request_corners_are_the_harness_ones(ours, harness, corner):
    set_name, example = CORNERS[corner]
    index = EDGE_SETS[set_name].index(example)
    problems = []
    for model in MODELS:
        mine = {key: [values[index]] for key, values in ours[model][1][set_name].items()}
        theirs = dict(harness[model][set_name])
        theirs["samples"] = [theirs["samples"][index]]
        if "tokens" in theirs:
            theirs["tokens"] = [theirs["tokens"][index]]
            found = text_mismatches(mine, theirs)
        else:
            found = choice_mismatches(mine, theirs)
        problems += [f"{model}: {problem}" for problem in found]
    assert not problems, "\n".join(problems)
