"""`raymerge demo`: merges of real skills on a real pretrained model, all local.

The base model is SmolLM2-135M-Instruct (`real_model`), the adapters are the three shipped with
raymerge (`demo/adapters/`, trained by `python -m raymerge.demo.train SKILL`): two-digit sums,
word order reversal and title-casing, which the base model writes none of and each adapter writes
almost all of on held-out items. One sweep merges every subset of them many ways, races the
merges on one generation set per skill, then lets a TPE search vary the weights of pairs; every
merge is ranked by how much of the three skills it keeps, and the demo closes with the share of
each adapter's own skill that the best merge keeps.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from raymerge.demo.demo import write_jsonl
from raymerge.demo.skills import SKILLS, line, skill_examples
from raymerge.demo.train import ADAPTERS

GENERATED = 64
"""Held-out items per skill's generation set (the racing's last round)."""
TEXTS = 32
"""Held-out lines per skill's text set (for jobs/local-demo.yaml; the demo scores generation)."""
ANSWER_TOKENS = {"sums": 4, "reverse": 5, "title": 4}
"""Tokens generated per answer: the longest held-out answer's (a space and up to three digits,
each a token; up to four words; up to three words), plus one for the word skills, whose words a
merge may split. Generating stops there, not at the newline: a decoding step costs as much for
one row as for all, and a right answer needs no more."""


def skill_metric(skill: str) -> str:
    """The metric that says how well a model has `skill`: exact match of its generation set."""
    return f"{skill}_gen.exact_match"


def real_demo_spec() -> dict[str, Any]:
    """A raced grid (every pair at two strengths through five combination types, the three
    together through two), then a TPE search over pairs with free weights, in one sweep."""
    pair_methods = [
        {"combination_type": "linear"},
        {"combination_type": "cat"},
        {"combination_type": "ties", "density": 0.5},
        {"combination_type": "dare_ties", "density": 0.5},
        # One of the methods PEFT does not have, merged in the adapters' own space.
        {"combination_type": "core_ties", "density": 0.5, "svd_rank": 16},
    ]
    return {
        "base_model": "./world/base",
        "adapters": {skill: f"./world/adapters/{skill}" for skill in SKILLS},
        "combinations": [
            {"choose": 2, "weights": [[1.0, 1.0], [0.7, 0.7]], "methods": pair_methods},
            {
                "choose": 3,
                "weights": [[1.0, 1.0, 1.0]],
                "methods": [pair_methods[1], pair_methods[4]],
            },
        ],
        # After the grid: weights are where it is coarsest, so the search varies them freely.
        "search": {
            "choose": 2,
            "weights": {"low": 0.3, "high": 1.3},
            "methods": [
                {"combination_type": ["linear", "cat"]},
                {"combination_type": ["ties", "core_ties"], "density": {"low": 0.3, "high": 0.9}},
                {"combination_type": "tsv", "svd_rank": [8, 16]},
            ],
            "budget": 10,
            "sampler": "tpe",
            "seed": 0,
        },
        "output": "./merges-out",
        "workers": 1,
        "cpus_per_worker": 2,  # one worker, in this process, on both cores
        "gpus_per_worker": 0,
        "seed": 0,
        "evaluate": {
            "datasets": {
                f"{skill}_gen": {
                    "path": f"./eval/{skill}_gen.jsonl",
                    "kind": "generate",
                    "max_new_tokens": ANSWER_TOKENS[skill],
                    "stop": ["\n"],
                }
                for skill in SKILLS
            },
            "max_samples": GENERATED,
            "batch_size": 32,
            "max_length": 48,
            "adapters_per_pass": 4,  # a race round's few examples, four merges' worth per pass
            # Higher is better: each skill's exact match, relative to the base model and in
            # units of its spread over the references (so each skill weighs the same).
            "objective": [{"metric": skill_metric(skill)} for skill in SKILLS],
            "racing": {"rule": "bound", "first": 16, "growth": 2.0},
        },
    }


def prepare_real_demo(out: Path, log: Callable[[str], None] = print) -> Path:
    """Lay out the demo under `out`: the base model (converted once, linked), the shipped
    adapters, the eval sets and the spec; returns the spec's path."""
    from raymerge.demo.real_model import real_base_model

    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    base = world / "base"
    if not (base / "config.json").exists():
        if base.is_symlink():  # to a cache that was cleared
            base.unlink()
        world.mkdir(parents=True, exist_ok=True)
        base.symlink_to(real_base_model(log=log), target_is_directory=True)
    for skill in SKILLS:
        adapter = world / "adapters" / skill
        shutil.rmtree(adapter, ignore_errors=True)  # always the shipped bytes
        shutil.copytree(ADAPTERS / skill, adapter)
    write_eval_sets(out / "eval", GENERATED)
    spec_path = out / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(real_demo_spec(), sort_keys=False))
    return spec_path


def write_eval_sets(folder: Path, generated: int, texts: int = TEXTS) -> dict[str, Path]:
    """Each skill's held-out items as a generation set (`SKILL_gen.jsonl`, `generated` of them)
    and the first `texts` as a text set (`SKILL.jsonl`); their paths by set name."""
    paths = {}
    for skill in SKILLS:
        held_out = skill_examples(skill, generated, "eval", seed=0)
        paths[f"{skill}_gen"] = write_jsonl(
            folder / f"{skill}_gen.jsonl",
            [{"prompt": prompt, "answer": answer} for prompt, answer in held_out],
        )
        paths[skill] = write_jsonl(
            folder / f"{skill}.jsonl",
            [{"text": line(prompt, answer)} for prompt, answer in held_out[:texts]],
        )
    return paths


def kept_skills(row: dict[str, Any], references: dict[str, Any]) -> list[dict[str, Any]]:
    """For each adapter in a leaderboard row's merge: its skill's score alone, the merge's score
    on it, the base model's, and the share of the adapter's own score that the merge keeps."""
    kept = []
    for skill in row["adapters"].split("+"):
        name, _, key = skill_metric(skill).rpartition(".")
        alone = references["adapters"][skill][name][key]
        merged = row[skill_metric(skill)]
        kept.append(
            {
                "skill": skill,
                "base": references["base"][name][key],
                "alone": alone,
                "merged": merged,
                "kept": merged / alone if alone else None,
            }
        )
    return kept
