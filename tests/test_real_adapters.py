"""Real LoRA adapters that other people trained (gpt2, ../shared/real_adapters, see SOURCES.md):
the six plain ones plan and merge exactly as PEFT's add_weighted_adapter does, on the fast engine
(GPT-2's Conv1D layers included); the two classification ones are refused, naming why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compare_merge, write_spec
from peft import PeftModel, get_peft_model_state_dict

from raymerge.cluster.driver import run_sweep
from raymerge.errors import InputError
from raymerge.merge.registry import METHODS, RankRule
from raymerge.sweep.plan import load_plan

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real_adapters"
PLAIN = ["tigrinya", "riddles", "story", "udacity", "ironhack_r4", "ironhack_bias"]

pytestmark = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"the real adapters are not here ({REAL} is absent)"
)

EQUAL_RANK = [m.name for m in METHODS.values() if m.rank is RankRule.EQUAL and m.peft]
OTHER = ["cat", "svd", "ties_svd"]
"""The other PEFT types, one per code path: exact concatenation, the low-rank SVD and the dense
SVD of a pruned delta (the other *_svd types share that path; test_conformance runs them all)."""


def _methods(types: list[str], **params) -> list[dict]:
    """One methods entry per type, with the parameters it takes."""
    entries = []
    for name in types:
        method = METHODS[name]
        entries.append(
            {"combination_type": name, **{k: v for k, v in params.items() if method.takes(k)}}
        )
    return entries


GROUPS = [
    # Three rank-8 adapters on c_attn and c_proj, two of them saved with fan_in_fan_out: false.
    {
        "adapters": ["tigrinya", "story", "riddles"],
        "weights": [[0.6, -0.3, 0.5]],
        "methods": _methods(EQUAL_RANK, density=0.5, majority_sign_method="frequency"),
    },
    # Every type on the two c_attn-only adapters (one with bias: lora_only, alpha/r = 0.25).
    {
        "adapters": ["udacity", "ironhack_bias"],
        "weights": [[0.7, 0.4]],
        "methods": _methods(EQUAL_RANK + OTHER, density=0.6, svd_full_matrices=False),
    },
    # Mixed ranks (4 and 8), fan_in_fan_out: false on the rank-4 one.
    {
        "adapters": ["ironhack_r4", "tigrinya"],
        "weights": [[1.0, -0.5]],
        "methods": [{"combination_type": ["cat", "svd"], "svd_full_matrices": False}],
    },
]


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    """A randomly initialised gpt2 of the real shapes (no weights exist here)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    return path


def _spec(base: Path, output: Path, names: list[str], groups: list[dict]) -> dict:
    return {
        "base_model": str(base),
        "adapters": {name: str(REAL / name) for name in names},
        "combinations": groups,
        "output": str(output),
        "workers": 1,
        "cpus_per_worker": 1,  # one LAPACK thread, as the reference below
        "gpus_per_worker": 0,
    }


def test_every_plain_adapter_is_accepted_and_the_classifiers_refused(gpt2_base, tmp_path):
    plan = load_plan(write_spec(tmp_path, _spec(gpt2_base, tmp_path / "out", PLAIN, GROUPS)))
    assert set(plan.adapters_used()) == set(PLAIN)
    for name in ("seqcls_mts", "seqcls_score"):
        spec = _spec(gpt2_base, tmp_path / "out", ["tigrinya", name], [])
        spec["combinations"] = [
            {
                "adapters": ["tigrinya", name],
                "weights": [[0.5, 0.5]],
                "methods": [{"combination_type": "cat"}],
            }
        ]
        spec["allow_base_mismatch"] = True
        with pytest.raises(InputError) as caught:
            load_plan(write_spec(tmp_path, spec, f"{name}.yaml"))
        text = str(caught.value)
        assert f"adapter {name!r}" in text
        if name == "seqcls_mts":
            assert "modules_to_save" in text
        else:
            assert "not LoRA factors (base_model.model.score.weight)" in text


@pytest.fixture(scope="module")
def merged(gpt2_base, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    plan = load_plan(write_spec(root, _spec(gpt2_base, root / "out", PLAIN, GROUPS)))
    summary = run_sweep(plan)
    assert summary.failed == 0, summary.failures
    records = [json.loads(p.read_text()) for p in Path(plan.output, "merges").glob("*/merge.json")]
    return plan, records


@pytest.fixture(scope="module")
def reference(gpt2_base):
    """PEFT itself: a PeftModel holding the six adapters, as a user's own loop would."""
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(gpt2_base), REAL / PLAIN[0], adapter_name=PLAIN[0]
    )
    for name in PLAIN[1:]:
        model.load_adapter(REAL / name, adapter_name=name)

    def merge(record: dict) -> tuple[dict[str, torch.Tensor], dict]:
        names = [a["name"] for a in record["adapters"]]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the worker merges: LAPACK's rounding depends on threads
        try:
            torch.manual_seed(record["merge_seed"])
            model.add_weighted_adapter(
                names, record["weights"], "merged", record["combination_type"], **record["params"]
            )
            state = get_peft_model_state_dict(model, adapter_name="merged")
            config = model.peft_config["merged"].to_dict()
        finally:
            torch.set_num_threads(threads)
            model.delete_adapter("merged")
        return {k: v.float() for k, v in state.items()}, config

    return merge


def test_no_merge_of_real_adapters_falls_back_to_peft(merged):
    _, records = merged
    assert len(records) == 5 + len(EQUAL_RANK + OTHER) + 2
    assert {r["engine"] for r in records} == {"fast"}, [r.get("engine_fallback") for r in records]


@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_real_merges_equal_add_weighted_adapter(merged, reference, group):
    plan, records = merged
    names = GROUPS[group]["adapters"]
    chosen = [r for r in records if [a["name"] for a in r["adapters"]] == names]
    assert chosen
    for record in chosen:
        expected, config = reference(record)
        folder = Path(plan.output, "merges", record["merge_id"])
        from safetensors.torch import load_file

        actual = load_file(folder / "adapter_model.safetensors")
        expected = {k.replace(".merged", ""): v for k, v in expected.items()}
        compare_merge(actual, expected, record, rel=1e-5, svd_delta_rel=1e-5)
        written = json.loads((folder / "adapter_config.json").read_text())
        assert written["fan_in_fan_out"] is True  # Conv1D layers, whatever the inputs said
        assert written["r"] == config["r"], record["combination_type"]
