"""Spec validation, pre-flight checks and plan expansion: no cluster needed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import base_spec, write_spec
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.errors import InputError, SpecError
from raymerge.sweep.plan import load_plan

runner = CliRunner()


def _plan(tmp_path: Path, spec: dict):
    return load_plan(write_spec(tmp_path, spec))


def _problems(tmp_path: Path, spec: dict) -> list[str]:
    with pytest.raises((SpecError, InputError)) as caught:
        _plan(tmp_path, spec)
    return caught.value.problems


def _copy_adapter(world, name: str, dest: Path) -> Path:
    shutil.copytree(world.adapters[name], dest)
    return dest


def test_expansion_counts_union_and_grids(world, tmp_path):
    spec = base_spec(
        world,
        tmp_path / "out",
        combinations=[
            {
                "choose": 2,
                "from": ["a", "b", "c"],
                "weights": [[0.5, 0.5], [1.0, -1.0]],
                "methods": [
                    {"combination_type": "linear"},
                    {"combination_type": "ties", "density": [0.3, 0.5]},
                ],
            },
            # Already covered by the group above: the plan is a union, so it adds nothing.
            {
                "adapters": ["a", "b"],
                "weights": [[0.5, 0.5]],
                "methods": [{"combination_type": "linear"}],
            },
            {
                "adapters": ["a", "d"],
                "weights": [[1.0, 1.0]],
                "methods": [{"combination_type": ["cat", "svd"], "svd_rank": [2, 4]}],
            },
        ],
    )
    plan = _plan(tmp_path, spec)
    # 3 pairs x 2 weight vectors x (1 linear + 2 ties densities) + 1 cat + 2 svd ranks
    assert plan.counts() == {"linear": 6, "ties": 12, "cat": 1, "svd": 2}
    tasks = list(plan.tasks())
    assert len({t.merge_id for t in tasks}) == len(tasks) == 21
    svd = [t for t in tasks if t.combination_type == "svd"]
    assert sorted(t.params["svd_rank"] for t in svd) == [2, 4]
    assert all("svd_rank" not in t.params for t in tasks if t.combination_type == "cat")
    assert {t.adapters for t in tasks if t.combination_type == "ties"} == {
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
    }
    assert plan.adapters_used() == ["a", "b", "c", "d"]


def test_merge_id_is_stable_and_covers_every_field(world, tmp_path):
    def ids(**overrides):
        method = {"combination_type": "svd", **overrides.pop("method", {})}
        group = {"adapters": ["a", "d"], "weights": [[0.5, 0.5]], "methods": [method]}
        group.update(overrides.pop("group", {}))
        output = overrides.pop("output", tmp_path / "out")
        spec = base_spec(world, output, combinations=[group], **overrides)
        return [t.merge_id for t in _plan(tmp_path, spec).tasks()]

    first = ids()
    assert first == ids()  # deterministic
    assert first == ids(method={"svd_full_matrices": True})  # explicit default = same merge
    assert first == ids(workers=7, output=str(tmp_path / "elsewhere"))  # not part of identity
    assert first != ids(seed=1)
    assert first != ids(method={"svd_rank": 2})
    assert first != ids(group={"weights": [[0.5, 0.25]]})
    assert first != ids(group={"adapters": ["d", "a"]})
    moved = dict(base_spec(world, tmp_path)["adapters"], d=str(world.adapters["d"]) + "/")
    assert first == ids(adapters=moved)  # a trailing slash names the same location
    relocated = dict(moved, d=str(_copy_adapter(world, "d", tmp_path / "d-copy")))
    assert first != ids(adapters=relocated)
    assert re.fullmatch(r"[0-9a-f]{16}", first[0])


def test_relative_locations_are_relative_to_the_spec_file(world, tmp_path):
    shutil.copytree(world.base_model, tmp_path / "models" / "base")
    _copy_adapter(world, "a", tmp_path / "adapters" / "a")
    _copy_adapter(world, "b", tmp_path / "adapters" / "b")
    spec = base_spec(
        world,
        "./out",
        base_model="./models/base",
        adapters={"a": "./adapters/a", "b": "file://" + str(tmp_path / "adapters" / "b")},
    )
    plan = load_plan(
        write_spec(tmp_path / "specs", spec, name="s.yaml").rename(tmp_path / "s.yaml")
    )
    assert plan.base_model == str(tmp_path / "models" / "base")
    assert plan.output == str(tmp_path / "out")
    assert plan.adapters["a"].uri == str(tmp_path / "adapters" / "a")
    assert plan.adapters["b"].uri == str(tmp_path / "adapters" / "b")


def test_hub_id_base_model_is_accepted_unchecked(world, tmp_path):
    plan = _plan(tmp_path, base_spec(world, tmp_path / "out", base_model="meta-llama/Llama-3.2-1B"))
    assert plan.base_model == "meta-llama/Llama-3.2-1B"


def _mutate(spec, world, tmp_path, case):
    """Apply one bad-input case to a valid spec; returns the substrings its error must name."""
    group = spec["combinations"][0]
    if case == "adapter location missing":
        spec["adapters"]["b"] = str(tmp_path / "nowhere")
        return ["adapter 'b'", "nowhere", "does not exist", "adapters.b"]
    if case == "adapter_config.json missing":
        (_copy_adapter(world, "b", tmp_path / "b") / "adapter_config.json").unlink()
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["adapter 'b'", "adapter_config.json not found"]
    if case == "adapter_config.json unreadable":
        (_copy_adapter(world, "b", tmp_path / "b") / "adapter_config.json").write_text("{r: 8,")
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["adapter 'b'", "adapter_config.json is not valid JSON"]
    if case == "not a LoRA config":
        path = _copy_adapter(world, "b", tmp_path / "b") / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "IA3"}))
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["adapter 'b'", "peft_type 'IA3'", "LoRA adapters only"]
    if case == "weights file missing":
        (_copy_adapter(world, "b", tmp_path / "b") / "adapter_model.safetensors").unlink()
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["adapter 'b'", "adapter_model.safetensors"]
    if case == "weights file corrupt":
        path = _copy_adapter(world, "b", tmp_path / "b") / "adapter_model.safetensors"
        path.write_bytes(b"\xff" * 64)
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["adapter 'b'", "not a safetensors file"]
    if case == "different base models":
        path = _copy_adapter(world, "b", tmp_path / "b") / "adapter_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "base_model_name_or_path": "other/model"}))
        spec["adapters"]["b"] = str(tmp_path / "b")
        return ["different base models", "other/model", "allow_base_mismatch"]
    if case == "ranks differ for linear":
        group["adapters"] = ["a", "d"]
        return ["combinations[0]", "linear need adapters of equal rank", "a r=8", "d r=4"]
    if case == "weights length":
        group["weights"] = [[0.5, 0.5], [1.0]]
        return ["combinations[0].weights[1]", "[1.0]", "2 adapters"]
    if case == "density missing":
        group["methods"] = [{"combination_type": "dare_ties"}]
        return ["combinations[0].methods[0]", "density is required for dare_ties"]
    if case == "density out of range":
        group["methods"] = [{"combination_type": "ties", "density": [0.5, 0]}]
        return ["combinations[0].methods[0].density", "density 0.0 is outside (0, 1]"]
    if case == "svd_rank below 1":
        group["methods"] = [{"combination_type": "svd", "svd_rank": 0}]
        return ["combinations[0].methods[0].svd_rank", "svd_rank 0 must be at least 1"]
    if case == "unknown combination type":
        group["methods"] = [{"combination_type": "average"}]
        return ["combinations[0].methods[0].combination_type", "'average'", "linear, cat, svd"]
    if case == "unknown adapter name":
        group["adapters"] = ["a", "zeta"]
        return ["combinations[0].adapters", "unknown adapter 'zeta'", "a, b, c, d"]
    if case == "duplicate adapter":
        group["adapters"] = ["a", "a"]
        return ["combinations[0].adapters", "'a' is listed twice"]
    if case == "unknown key":
        spec["wokers"] = 2
        return ["wokers: unknown key"]
    if case == "parameter that does not apply":
        group["methods"] = [{"combination_type": "linear", "svd_rank": 4}]
        return ["combinations[0].methods[0]", "svd_rank does not apply to combination type linear"]
    if case == "choose larger than from":
        spec["combinations"] = [
            {"choose": 3, "from": ["a", "b"], "weights": [[1, 1, 1]], "methods": group["methods"]}
        ]
        return ["combinations[0].choose", "3 is more than the 2 adapters"]
    if case == "svd_driver on CPU workers":
        group["methods"] = [{"combination_type": "svd", "svd_driver": "gesvdj"}]
        return ["combinations[0].methods[0].svd_driver", "gesvdj", "only on CUDA", "no GPU"]
    raise AssertionError(case)


BAD_INPUTS = [
    "adapter location missing",
    "adapter_config.json missing",
    "adapter_config.json unreadable",
    "not a LoRA config",
    "weights file missing",
    "weights file corrupt",
    "different base models",
    "ranks differ for linear",
    "weights length",
    "density missing",
    "density out of range",
    "svd_rank below 1",
    "unknown combination type",
    "unknown adapter name",
    "duplicate adapter",
    "unknown key",
    "parameter that does not apply",
    "choose larger than from",
    "svd_driver on CPU workers",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_each_bad_input_is_named_and_exits_2_writing_nothing(world, tmp_path, case):
    spec = base_spec(world, tmp_path / "out")
    expected = _mutate(spec, world, tmp_path, case)
    problems = _problems(tmp_path, spec)
    assert len(problems) == 1, problems
    for part in expected:
        assert part in problems[0], f"{part!r} not in {problems[0]!r}"

    result = runner.invoke(app, ["run", str(tmp_path / "sweep.yaml")])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()


def test_rank_mismatch_is_fine_for_cat_and_svd(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0].update(
        adapters=["a", "d"],
        methods=[{"combination_type": ["cat", "svd", "ties_svd"], "density": 0.5}],
    )
    assert _plan(tmp_path, spec).counts() == {"cat": 1, "svd": 1, "ties_svd": 1}


def test_allow_base_mismatch(world, tmp_path):
    spec = base_spec(world, tmp_path / "out", allow_base_mismatch=True)
    _mutate(spec, world, tmp_path, "different base models")
    assert _plan(tmp_path, spec).counts() == {"linear": 1}


def test_every_problem_is_reported_at_once(world, tmp_path):
    spec = base_spec(world, tmp_path / "out", workers=0)
    spec["adapters"]["b"] = str(tmp_path / "missing-b")
    spec["combinations"][0]["methods"] = [{"combination_type": "ties"}]
    spec["combinations"].append(
        {"adapters": ["a", "x"], "weights": [[1.0]], "methods": [{"combination_type": "linear"}]}
    )
    path = write_spec(tmp_path, spec)
    # The spec's own errors stop validation of cross-key rules, but never hide input errors.
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    for part in ["workers", "density is required for ties", "adapter 'b'", "missing-b"]:
        assert part in result.output
    assert not (tmp_path / "out").exists()

    spec["workers"] = 1
    spec["combinations"][0]["methods"] = [{"combination_type": "linear"}]
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2
    assert "3 problems" in result.output
    for part in ["adapter 'b'", "unknown adapter 'x'", "combinations[1].weights[0]"]:
        assert part in result.output


def test_credentials_in_storage_options_are_refused_and_never_echoed(world, tmp_path):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    spec = base_spec(
        world,
        tmp_path / "out",
        storage_options={"client_kwargs": {"aws_secret_access_key": secret}, "anon": False},
    )
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2
    assert "client_kwargs.aws_secret_access_key" in result.output
    assert "credential chain" in result.output
    assert secret not in result.output


def test_plan_command_prints_counts_and_json(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["methods"].append({"combination_type": "ties", "density": [0.2, 0.4]})
    path = write_spec(tmp_path, spec)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "3 merges" in result.output and "ties" in result.output and "linear" in result.output

    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0
    # The JSON alone on stdout: a line about library warnings that earlier tests in this
    # process raised goes to stderr, as it does for a user piping the plan to a file.
    plan = json.loads(result.stdout)
    assert plan["total"] == 3 and plan["by_type"] == {"linear": 1, "ties": 2}
    assert sorted(plan["adapters"]) == ["a", "b"]
    assert plan["adapters"]["b"]["lora_alpha"] == 4
    assert [t["params"].get("density") for t in plan["tasks"]] == [None, 0.2, 0.4]
    assert all(len(t["merge_id"]) == 16 for t in plan["tasks"])
    assert not (tmp_path / "out").exists()


def test_missing_or_broken_spec_file(tmp_path):
    result = runner.invoke(app, ["plan", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "not found" in result.output
    (tmp_path / "bad.yaml").write_text("base_model: [unclosed\n")
    result = runner.invoke(app, ["plan", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "not valid YAML" in result.output


@pytest.mark.parametrize(
    ("cpus", "in_process", "omp", "threads"),
    [
        (None, True, "3", 3),  # a run in this process: the cores it may use, as OMP says
        (None, True, None, "cores"),  # ... or every core it may run on
        (None, False, "3", 1),  # a Ray worker reserves 1 CPU: 1 thread
        (2, True, "3", 2),  # the spec says: as it says
        (2, False, None, 2),
    ],
)
def test_a_workers_threads_are_the_specs_or_the_cores_it_has(
    world, tmp_path, monkeypatch, cpus, in_process, omp, threads
):
    import os

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    spec = base_spec(world, tmp_path)
    if cpus is not None:
        spec["cpus_per_worker"] = cpus
    plan = load_plan(write_spec(tmp_path, spec))
    expected = len(os.sched_getaffinity(0)) if threads == "cores" else threads
    assert plan.worker_config(in_process=in_process).num_threads == expected
    assert plan.spec.reserved_cpus == (cpus or 1)
