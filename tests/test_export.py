"""`raymerge export`: a recorded merge as a full model that transformers loads, whose logits are
the PeftModel's (base + merged adapter, unmerged), from local and S3 outputs, rebuilt where keep
top-k dropped its files, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import base_spec, reload_merged, write_spec
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.cluster.driver import run_sweep
from raymerge.cluster.export import PROVENANCE, export
from raymerge.errors import InputError, SpecError
from raymerge.store import commits, manifest, storage
from raymerge.sweep.plan import load_plan

TOLERANCE = 1e-4
"""Largest logit difference float32 noise may make (the fold's rounding, a different matmul order:
about 1e-6 here); a broken fold (adapter left out, wrong scaling or weight) moves them by ~1."""
MERGES = [
    {"adapters": ["a", "b"], "weights": [[0.7, 0.6]], "methods": [{"combination_type": "cat"}]},
    {"adapters": ["a", "d"], "weights": [[1.0, -0.5]], "methods": [{"combination_type": "svd"}]},
]
"""Two merges of adapters with different ranks and scalings (alpha/r 2, 0.5, 4)."""


def _sweep(world, output: str, folder: Path, **overrides) -> list[str]:
    """Run the two merges into `output` in this process; their merge ids."""
    spec = base_spec(world, output, combinations=MERGES, **overrides)
    plan = load_plan(write_spec(folder, spec))
    summary = run_sweep(plan, use_ray=False)
    assert (summary.done, summary.failed) == (2, 0), summary.failures
    return [task.merge_id for task in plan.tasks()]


@pytest.fixture(scope="module")
def swept(world, tmp_path_factory):
    """A local output with two committed merges: (output, merge ids)."""
    root = tmp_path_factory.mktemp("export-sweep")
    return str(root / "out"), _sweep(world, str(root / "out"), root)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=_tokens()).logits.float()


@pytest.fixture(scope="module")
def expected(world, swept):
    """Each merge's logits from the PeftModel (base + merged adapter, not merged), and the base
    model's own."""
    output, merge_ids = swept
    peft = {
        m: _logits(reload_merged(world.base_model, Path(output, "merges", m))) for m in merge_ids
    }
    return peft, _logits(AutoModelForCausalLM.from_pretrained(world.base_model))


def _assert_same_logits(folder: Path, want: torch.Tensor, base: torch.Tensor, tol=TOLERANCE):
    got = _logits(AutoModelForCausalLM.from_pretrained(folder))
    assert (want - base).abs().max() > 100 * tol  # the merge changes them: a fold that is off shows
    assert (got - want).abs().max() <= tol, (got - want).abs().max()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    return found


def test_the_export_loads_with_transformers_and_gives_the_peft_models_logits(
    world, swept, expected, tmp_path
):
    output, merge_ids = swept
    peft, base = expected
    for merge_id in merge_ids:
        result = export(output, merge_id, str(tmp_path / merge_id))
        assert (result.dtype, result.shards, result.rebuilt) == ("float32", 1, False)
        assert result.tokenizer and result.model_class == "AutoModelForCausalLM"
        _assert_same_logits(tmp_path / merge_id, peft[merge_id], base)
    folder = tmp_path / merge_ids[0]
    names = sorted(_tensors(folder))
    assert names == sorted(_tensors(world.base_model)) and not any("lora" in n for n in names)
    assert AutoTokenizer.from_pretrained(folder)("ab")["input_ids"] == [97, 98]
    info = json.loads((folder / PROVENANCE).read_text())
    record = commits.read_record(output, merge_ids[0])
    assert info["merge_id"] == merge_ids[0] and info["output"] == output
    assert info["base_model"] == str(world.base_model) and info["dtype"] == "float32"
    assert info["adapter_files"] == {n: f["sha256"] for n, f in record["files"].items()}
    assert info["versions"]["raymerge"] and info["rebuilt"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_small_max_shard_size_gives_several_shards_and_an_index(swept, expected, tmp_path):
    output, merge_ids = swept
    result = export(output, merge_ids[0], str(tmp_path / "m"), max_shard_size="100KB")
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert result.shards == len(shards) >= 3
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 100_000 + 4096 or len(_tensors_in(p)) == 1 for p in shards)
    _assert_same_logits(tmp_path / "m", expected[0][merge_ids[0]], expected[1])
    umask = os.umask(0)
    os.umask(umask)
    # As a plain mkdir and write would leave them: a server running as another user reads them.
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
    for path in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def _tensors_in(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_dtype_bfloat16_saves_bfloat16_tensors(swept, expected, tmp_path):
    output, merge_ids = swept
    runner = CliRunner()
    args = ["export", output, merge_ids[1], "--to", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output and "from_pretrained" in result.output
    tensors = _tensors(tmp_path / "bf16")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # folded in float32, rounded once: within bfloat16's rounding of the PeftModel's logits
    peft, base = expected
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert (_logits(model) - peft[merge_ids[1]]).abs().max() < 0.1 * (
        peft[merge_ids[1]] - base
    ).abs().max()


def test_a_merge_whose_files_keep_top_k_dropped_is_rebuilt_and_exported(swept, expected, tmp_path):
    output, merge_ids = swept
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    merge_id = merge_ids[1]
    record = commits.read_record(str(copy), merge_id)
    commits.set_kept(str(copy), merge_id, False)  # as keep top-k does: the record first
    folder = manifest.merge_dir(str(copy), merge_id)
    storage.remove([storage.join(folder, name) for name in record["files"]])
    assert not Path(folder, "adapter_model.safetensors").exists()
    result = export(str(copy), merge_id, str(tmp_path / "full"))
    assert result.rebuilt
    _assert_same_logits(tmp_path / "full", expected[0][merge_id], expected[1])
    assert json.loads((tmp_path / "full" / PROVENANCE).read_text())["rebuilt"] is True
    assert not Path(folder, "adapter_model.safetensors").exists()  # the sweep is left as it was


def test_a_rebuilt_adapter_that_differs_from_its_record_is_refused(swept, tmp_path):
    output, merge_ids = swept
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    record = commits.read_record(str(copy), merge_ids[0])
    record["weights"] = [0.7, 0.5]  # not the recipe its digests came from
    for entry in record["files"].values():
        entry["kept"] = False
    manifest.commit_merge(str(copy), record)
    result = CliRunner().invoke(
        app, ["export", str(copy), merge_ids[0], "--to", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "differ from its merge.json" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_kept_files_that_changed_or_went_missing_are_refused(swept, tmp_path):
    output, merge_ids = swept
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    weights = Path(manifest.merge_dir(str(copy), merge_ids[0]), "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    for change, message in [
        ("one bit flipped", f"{weights} differs from its merge.json (sha256)"),
        ("deleted", f"merge {merge_ids[0]} is not committed"),
    ]:
        if change == "deleted":
            weights.unlink()
        result = CliRunner().invoke(
            app, ["export", str(copy), merge_ids[0], "--to", str(tmp_path / "x")]
        )
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and message in said, (change, said)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0123456789abcdef"], "merge 0123456789abcdef is not recorded"),
        (["not-a-merge"], "not a merge id (16 hex digits)"),
        (["{id}", "--dtype", "int8"], "--dtype 'int8': use one of auto, float32"),
        (["{id}", "--max-shard-size", "big"], "--max-shard-size 'big': not a size"),
    ],
)
def test_bad_input_is_named_with_exit_code_2(swept, tmp_path, args, message):
    output, merge_ids = swept
    args = [a.replace("{id}", merge_ids[0]) for a in args]
    result = CliRunner().invoke(app, ["export", output, *args, "--to", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_a_non_empty_folder_is_replaced_only_with_overwrite(swept, tmp_path):
    output, merge_ids = swept
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("mine")
    args = ["export", output, merge_ids[0], "--to", str(target)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "is not empty" in refused.output, refused.output
    assert "--overwrite" in refused.output and (target / "old.txt").exists()
    done = CliRunner().invoke(app, [*args, "--overwrite"])
    assert done.exit_code == 0, done.output
    assert (target / "config.json").exists() and not (target / "old.txt").exists()
    with pytest.raises(InputError, match="which the export reads"):  # never the sweep itself
        export(output, merge_ids[0], str(Path(output).parent), overwrite=True)


def test_an_unreadable_base_model_is_named_and_leaves_nothing(world, swept, tmp_path):
    output, merge_ids = swept
    copy, base = tmp_path / "out", tmp_path / "base"
    shutil.copytree(output, copy)
    shutil.copytree(world.base_model, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    record = commits.read_record(str(copy), merge_ids[0])
    manifest.commit_merge(str(copy), {**record, "base_model": str(base)})
    with pytest.raises(InputError, match=f"base_model {base}: its weights cannot be loaded"):
        export(str(copy), merge_ids[0], str(tmp_path / "x"))
    manifest.commit_merge(str(copy), {**record, "base_model": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match="cannot read its config"):
        export(str(copy), merge_ids[0], str(tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # nothing half-written


def test_a_base_model_without_a_tokenizer_is_exported_without_one_and_says_so(
    world, swept, tmp_path
):
    output, merge_ids = swept
    copy, base = tmp_path / "out", tmp_path / "base"
    shutil.copytree(output, copy)
    shutil.copytree(world.base_model, base, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    record = commits.read_record(str(copy), merge_ids[0])
    manifest.commit_merge(str(copy), {**record, "base_model": str(base)})
    result = export(str(copy), merge_ids[0], str(tmp_path / "full"))
    assert not result.tokenizer and "has no tokenizer" in result.notes[0]
    assert not list((tmp_path / "full").glob("tokenizer*"))
    assert json.loads((tmp_path / "full" / PROVENANCE).read_text())["tokenizer"] is False


def test_shard_sizes_are_parsed_or_refused():
    from raymerge.cluster.export import shard_size

    assert shard_size("2GiB") == 2 * 2**30 and shard_size("500 MB") == 500 * 10**6
    for bad in ("0GB", "-1GB", "5XB", ""):
        with pytest.raises(SpecError):
            shard_size(bad)


def test_export_from_an_s3_output(world, swept, expected, s3, s3_endpoint, tmp_path, monkeypatch):
    """Output and base model on S3, the store named by AWS_ENDPOINT_URL (as the CLI is used)."""
    fs, bucket = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "cache"))
    for path in world.base_model.iterdir():
        fs.put_file(str(path), f"{bucket}/base/{path.name}")
    output, base = f"s3://{bucket}/out", f"s3://{bucket}/base"
    merge_ids = _sweep(world, output, tmp_path, base_model=base)
    assert merge_ids == swept[1]
    args = ["export", output, merge_ids[0], "--to", str(tmp_path / "full")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "and its tokenizer" in result.output, result.output
    _assert_same_logits(tmp_path / "full", expected[0][merge_ids[0]], expected[1])
    info = json.loads((tmp_path / "full" / PROVENANCE).read_text())
    assert (info["output"], info["base_model"], info["tokenizer"]) == (output, base, True)
