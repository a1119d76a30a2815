"""Inputs on the Hugging Face Hub (`hf://`), read for real through huggingface_hub from a Hub
cache it lays out, offline: a sweep of Hub adapters on a Hub base model, pinned to commits; a
rerun after the branch moved; an unreachable Hub with nothing cached; the token never shown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import base_spec, free_port, write_spec
from hub_cache import folder_files, publish
from huggingface_hub import scan_cache_dir

from raymerge.merge.format import WEIGHTS_FILE
from raymerge.store import hub, storage

TOKEN = "hf_raymergeTestTokenNeverShown0123456789"


def _raymerge(*args: str, env: dict[str, str], timeout: float = 240):
    """The CLI in its own process, which reads the Hub settings from `env` at start."""
    return subprocess.run(
        [sys.executable, "-m", "raymerge", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_TOKEN": TOKEN}


@pytest.fixture
def hub_world(world, tmp_path):
    """The world's base model as hf://acme/tiny-base and adapters a and b as subfolders of
    hf://acme/loras, in a Hub cache; returns (cache, spec dict, the loras' commit)."""
    cache = tmp_path / "hub"
    publish(cache, "acme/tiny-base", folder_files(world.base_model))
    files = {**folder_files(world.adapters["a"], "math/")}
    commit = publish(cache, "acme/loras", {**files, **folder_files(world.adapters["b"], "code/")})
    spec = base_spec(
        world,
        tmp_path / "out",
        base_model="hf://acme/tiny-base",
        adapters={"a": "hf://acme/loras/math", "b": "hf://acme/loras@main/code"},
    )
    spec["combinations"][0]["methods"] = [{"combination_type": t} for t in ("linear", "ties")]
    spec["combinations"][0]["methods"][1]["density"] = 0.5
    return cache, spec, commit


def test_locations_on_the_hub_are_parsed_and_malformed_ones_refused():
    assert storage.resolve("HF://acme/loras@v1.0/math/", Path("/x")) == "hf://acme/loras@v1.0/math"
    ref = hub.parse("hf://acme/loras@refs%2Fpr%2F3")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("acme/loras", "refs/pr/3", "")
    assert hub.parse(ref.uri()) == ref
    for bad, says in [
        ("hf://loras", "ORG/NAME"),
        ("hf://acme/lo ras", "repository id"),
        ("hf://acme/loras@v1;rm/x", "revision"),
        ("hf://acme/loras/../secrets", "plain path"),
    ]:
        with pytest.raises(ValueError, match=says):
            storage.resolve(bad, Path("/x"))


def test_a_sweep_of_hub_adapters_reads_the_cache_offline_and_pins_commits(
    hub_world, world, tmp_path
):
    cache, spec, commit = hub_world
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {"acme/tiny-base", "acme/loras"}
    path = write_spec(tmp_path, spec)
    planned = _raymerge("plan", str(path), env=_offline(cache))
    assert planned.returncode == 0, planned.stderr
    ran = _raymerge("run", str(path), env=_offline(cache))
    assert ran.returncode == 0, ran.stderr

    out = tmp_path / "out"
    records = [json.loads(p.read_text()) for p in sorted(out.glob("merges/*/merge.json"))]
    assert len(records) == 2
    pinned = {"a": f"hf://acme/loras@{commit}/math", "b": f"hf://acme/loras@{commit}/code"}
    for record in records:
        assert {a["name"]: a["uri"] for a in record["adapters"]} == pinned
        assert record["base_model"].startswith("hf://acme/tiny-base@")
    inputs = json.loads((out / "inputs.json").read_text())["adapters"]
    assert inputs["hf://acme/loras/math"]["commit"] == commit
    assert inputs["hf://acme/loras@main/code"]["resolved"] == pinned["b"]

    # The same sweep from local copies of the same files writes the same bytes.
    local = base_spec(world, tmp_path / "local-out")
    local["combinations"] = spec["combinations"]
    assert _raymerge("run", str(write_spec(tmp_path, local, "local.yaml")), env={}).returncode == 0

    def digests(records):
        return {r["combination_type"]: r["files"][WEIGHTS_FILE]["sha256"] for r in records}

    made_locally = [
        json.loads(p.read_text()) for p in (tmp_path / "local-out").glob("merges/*/merge.json")
    ]
    assert digests(made_locally) == digests(records)

    written = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for text in [planned.stdout, planned.stderr, ran.stdout, ran.stderr, *written]:
        assert TOKEN not in (text if isinstance(text, str) else text.decode("latin-1"))


def test_a_rerun_after_the_hub_branch_moved_names_the_changed_adapter(hub_world, world, tmp_path):
    cache, spec, first = hub_world
    path = write_spec(tmp_path, spec)
    assert _raymerge("run", str(path), env=_offline(cache)).returncode == 0
    # main moves: `math` gets adapter c's weights (another adapter, same name), `code` is as was.
    retrained = folder_files(world.adapters["c"], "math/")
    second = publish(
        cache, "acme/loras", {**retrained, **folder_files(world.adapters["b"], "code/")}
    )

    again = _raymerge("run", str(path), env=_offline(cache))
    assert again.returncode == 2, again.stdout + again.stderr
    said = " ".join((again.stdout + again.stderr).split())
    assert "adapter 'a' (hf://acme/loras/math) changed" in said
    assert f"pointed at {first}, it now points at {second}" in said
    assert "2 committed merge(s)" in said
    assert "'b'" not in said  # its files did not change with the commit


def test_a_scored_rerun_after_the_hub_base_model_moved_is_refused(hub_world, world, tmp_path):
    cache, spec, _ = hub_world
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc", "de", "fghi")))
    spec["evaluate"] = {"datasets": {"held": str(texts)}, "max_samples": 3, "max_length": 8}
    path = write_spec(tmp_path, spec)
    assert _raymerge("run", str(path), env=_offline(cache)).returncode == 0
    first = json.loads((tmp_path / "out" / "inputs.json").read_text())["base_model"]["commit"]
    files = folder_files(world.base_model)
    second = publish(cache, "acme/tiny-base", {**files, "NOTICE": files["config.json"]})

    again = _raymerge("run", str(path), env=_offline(cache))
    said = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 2, said
    assert f"base_model hf://acme/tiny-base moved since the merges in {tmp_path / 'out'}" in said
    assert f"pointed at {first}, it now points at {second}; 2 committed merge(s)" in said

    spec["base_model"] = f"hf://acme/tiny-base@{first}"  # as the message says: pin the old one
    pinned = _raymerge("run", str(write_spec(tmp_path, spec)), env=_offline(cache))
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["skipped"], summary["done"]) == (2, 0)  # the merges scored on `first`


def test_an_unreachable_hub_with_nothing_cached_is_a_clear_error(hub_world, tmp_path):
    _, spec, _ = hub_world
    path = write_spec(tmp_path, spec)
    empty = tmp_path / "empty-cache"
    offline = _raymerge("plan", str(path), env=_offline(empty), timeout=120)
    down = _raymerge(
        "plan",
        str(path),
        env={
            "HF_HUB_CACHE": str(empty),
            "HF_TOKEN": TOKEN,
            "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        },
        timeout=120,
    )
    for result, why in [(offline, "HF_HUB_OFFLINE is set"), (down, "no answer")]:
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2, said
        assert "Traceback" not in said
        assert f"acme/loras on the Hugging Face Hub cannot be reached ({why})" in said
        assert f"the Hub cache ({empty}) does not hold hf://acme/loras/math's files" in said
        assert "base_model hf://acme/tiny-base" in said
        assert TOKEN not in said
    shutil.rmtree(empty, ignore_errors=True)
