"""Bad data and unlucky storage: non-finite adapters and results are never committed, changed
inputs are noticed, and a read-only or full disk ends the run with one clear line, nothing
half-written and nothing half-listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import base_spec, write_spec
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.cluster.driver import run_sweep
from raymerge.cluster.worker import MergeWorker
from raymerge.demo.world import AdapterShape, build_adapter
from raymerge.errors import InputError
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan

KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def _poisoned(world, tmp_path: Path, name: str, value: float) -> Path:
    path = shutil.copytree(world.adapters["b"], tmp_path / name)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[KEY][0, 3] = value
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


def _committed(output: str) -> set[str]:
    return {p.parent.name for p in Path(output, "merges").glob("*/merge.json")}


def test_non_finite_inputs_and_results_are_never_committed(world, ray_cluster, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["adapters"]["nan"] = str(_poisoned(world, tmp_path, "nan", float("nan")))
    spec["adapters"]["inf"] = str(_poisoned(world, tmp_path, "inf", float("inf")))
    spec["combinations"] = [
        {
            "adapters": ["a", "nan"],
            "weights": [[0.5, 0.5]],
            "methods": [
                {"combination_type": ["linear", "cat", "ties"], "density": 0.5},
                {"combination_type": "svd"},
            ],
        },
        {
            "adapters": ["a", "inf"],
            "weights": [[0.5, 0.5]],
            "methods": [{"combination_type": "cat"}],
        },
        # Finite inputs, finite weights, but a product beyond float32: the result overflows.
        {
            "adapters": ["a", "b"],
            "weights": [[3e38, 1.0]],
            "methods": [{"combination_type": "svd"}],
        },
        {"adapters": ["a", "b"], "weights": [[0.5, 0.5]], "methods": [{"combination_type": "cat"}]},
    ]
    plan = load_plan(write_spec(tmp_path, spec))
    summary = run_sweep(plan)
    assert (summary.done, summary.failed) == (1, 6)
    lines = {line["merge_id"]: line for line in read_manifest(plan.output)}
    for line in lines.values():
        names = [a["name"] for a in line["adapters"]]
        if "nan" in names or "inf" in names:
            bad = "nan" if "nan" in names else "inf"
            assert line["status"] == "failed"
            assert f"adapter {bad!r}" in line["error"] and KEY in line["error"], line["error"]
            assert "non-finite" in line["error"]
        elif line["weights"][0] > 1:
            assert line["status"] == "failed" and "not finite in float32" in line["error"]
    done = [m for m, line in lines.items() if line["status"] == "done"]
    assert _committed(plan.output) == set(done)
    # No trace of the failed merges on disk, not even an empty folder.
    assert {p.name for p in Path(plan.output, "merges").iterdir()} == set(done)


def test_a_changed_input_is_noticed_and_rebuilt_on_request(world, ray_cluster, tmp_path):
    b = shutil.copytree(world.adapters["b"], tmp_path / "b")
    spec = base_spec(world, tmp_path / "out", workers=1)
    spec["adapters"]["b"] = str(b)
    spec["combinations"] = [
        {
            "choose": 2,
            "from": ["a", "b", "c"],
            "weights": [[0.5, 0.5]],
            "methods": [{"combination_type": ["linear", "cat"]}],
        }
    ]
    path = write_spec(tmp_path, spec)
    plan = load_plan(path)
    assert run_sweep(plan).done == 6
    stamps = {m: Path(plan.output, "merges", m, "merge.json").stat().st_mtime_ns
              for m in _committed(plan.output)}  # fmt: skip

    # Replace b by another valid adapter of the same shape: the plan cannot tell.
    other = build_adapter(world.base_model, tmp_path / "other", AdapterShape(r=8), seed=77)
    shutil.copy(other / "adapter_model.safetensors", b / "adapter_model.safetensors")
    with pytest.raises(InputError) as caught:
        run_sweep(load_plan(path))
    [problem] = caught.value.problems
    assert f"adapter 'b' ({b}) changed since the merges" in problem
    assert "4 committed merge(s) used the version" in problem
    assert "--rebuild-changed" in problem and "new `output`" in problem
    assert _committed(plan.output) == set(stamps)  # nothing touched

    result = CliRunner().invoke(app, ["run", str(path), "--rebuild-changed"])
    assert result.exit_code == 0, result.output
    new_digest = json.loads(Path(plan.output, "inputs.json").read_text())["adapters"][str(b)][
        "weights_sha256"
    ]
    lines = read_manifest(plan.output)
    assert len(lines) == 6 and all(line["status"] == "done" for line in lines)
    for line in lines:
        merge_json = Path(plan.output, "merges", line["merge_id"], "merge.json")
        record = json.loads(merge_json.read_text())
        used_b = [a for a in record["adapters"] if a["name"] == "b"]
        if used_b:  # rebuilt from the new b
            assert used_b[0]["weights_sha256"] == new_digest
            assert merge_json.stat().st_mtime_ns != stamps[line["merge_id"]]
        else:  # untouched
            assert merge_json.stat().st_mtime_ns == stamps[line["merge_id"]]


def test_an_input_truncated_after_planning_names_the_adapter_and_file(world, tmp_path):
    b = shutil.copytree(world.adapters["b"], tmp_path / "b")
    spec = base_spec(world, tmp_path / "out")
    spec["adapters"]["b"] = str(b)
    plan = load_plan(write_spec(tmp_path, spec))
    data = (b / "adapter_model.safetensors").read_bytes()
    (b / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    [task] = plan.tasks()
    result = MergeWorker(0, plan.worker_config()).merge(task)
    assert result.status == "failed"
    assert f"adapter 'b' ({b})" in result.error and "adapter_model.safetensors" in result.error
    assert "truncated or replaced" in result.error
    assert not Path(plan.output, "merges").exists()


def _cli_run(spec_path: Path) -> tuple[int, str]:
    """`raymerge run` in this process (on the session's Ray instance): exit code and output."""
    result = CliRunner().invoke(app, ["run", str(spec_path)])
    return result.exit_code, result.output


def _no_partial_merges(output: Path) -> None:
    """Every merge folder is complete and committed; no temporary file anywhere."""
    assert not [p for p in output.rglob("*.tmp")], list(output.rglob("*.tmp"))
    for folder in (output / "merges").iterdir() if (output / "merges").exists() else []:
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "merge.json",
        ], folder


def test_a_read_only_output_is_one_clear_error(world, ray_cluster, tmp_path, mount):
    read_only = mount("ro", "ro,size=1m")
    spec = base_spec(world, read_only / "out")
    code, output = _cli_run(write_spec(tmp_path, spec))
    assert code == 1, output
    assert "Traceback" not in output
    assert f"the output {read_only / 'out'} is not writable" in output
    assert "Read-only file system" in output
    assert list(read_only.iterdir()) == []


def test_a_full_disk_stops_the_sweep_cleanly_and_a_rerun_completes(
    world, ray_cluster, tmp_path, mount
):
    small = mount("small", "size=160k")
    spec = base_spec(world, small / "out", workers=1)
    spec["combinations"][0]["weights"] = [[0.1 * i, 1.0] for i in range(1, 11)]
    spec["combinations"][0]["methods"] = [{"combination_type": "cat"}]  # ~64 KB each
    path = write_spec(tmp_path, spec)
    code, output = _cli_run(path)
    assert code == 1, output
    assert "Traceback" not in output
    assert "No space left on device" in output
    assert "run the same spec again" in output
    output = small / "out"
    _no_partial_merges(output)
    committed = _committed(str(output))
    assert 0 < len(committed) < 10
    listed = {line["merge_id"] for line in read_manifest(str(output)) if line["status"] == "done"}
    assert listed <= committed  # nothing listed that is not committed

    # Space again (a copy on a roomier disk): the rerun completes, each merge exactly once.
    roomy = tmp_path / "roomy"
    shutil.copytree(output, roomy)
    spec["output"] = str(roomy)
    code, output = _cli_run(write_spec(tmp_path, spec, "roomy.yaml"))
    assert code == 0, output
    assert f"Skipping {len(committed)} merges already done" in output
    lines = read_manifest(str(roomy))
    assert len(lines) == 10 and all(line["status"] == "done" for line in lines)
    _no_partial_merges(roomy)
