"""The commands of the README and the documentation pages, as written, from a fresh working
directory with relative paths: the folder a user has after cloning and `make demo` (jobs/ and
./raymerge-demo), with their own base model, adapters and eval set where the first sweep names
them (./models, ./adapters, ./eval), nothing absolute. Every shell block of README.md and
docs/**/*.md that is not marked illustrative is run, command by command (tests/doc_examples.py
finds them; test_docs checks that every other block is marked). They run through the CLI's entry
point in this process; test_scale, test_s3 and test_spec_hardening run `python -m raymerge`
itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import doc_examples
import pytest
from typer.testing import CliRunner

from raymerge.cli import app
from raymerge.store.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent

COVERED_ELSEWHERE = {
    "raymerge run  SPEC --address auto": "test_scale (RAY_ADDRESS) and test_submit",
    "raymerge run  SPEC --output s3://b/sweeps/x --workers 8 --gpus-per-worker 2": "test_s3",
    "raymerge run  SPEC --fail-fast": "test_scale.test_fail_fast_stops_dispatching",
    "raymerge run  SPEC --ray": "test_startup",
    "raymerge submit SPEC --address http://HEAD:8265 --follow": "test_submit",
}
"""Commands with placeholders (a spec, a cluster): run by the tests named."""

SMALL_WORLD = ["--hidden-size", "64", "--layers", "1", "--adapters", "3", "--types", "linear"]
SMALL_WORLD += ["--steady-seconds", "1"]
"""bench merge's own defaults take minutes: the same command on a smaller world, shorter."""
TINY_DEMO = ["--tiny"]
"""The real-model demo takes minutes (test_real_demo plans it; `make demo` runs it): the same
command on the 64-wide world, which jobs/local-demo.yaml's relative paths also fit."""


def _doc_commands() -> list[tuple[doc_examples.Block, str]]:
    """Every command of every shell block that is run, with its block, in page order."""
    return [
        (block, command)
        for block in doc_examples.shell_blocks_run()
        for command in block.commands()
    ]


def _spec_file(block: doc_examples.Block, command: str, cwd: Path) -> None:
    """A `plan` or `run` command's spec, where it is not a file of the repository (jobs/...), is
    the page's spec before the command: written where the command names it."""
    words = command.split()
    if words[1] in ("plan", "run") and not (ROOT / words[2]).is_file():
        spec = doc_examples.spec_before(block)
        assert spec is not None, f"{block.where()}: {command}: no spec before it on the page"
        (cwd / words[2]).write_text(spec.text)


@pytest.fixture(scope="module")
def fresh_clone(demo_dir, tmp_path_factory):
    """A working directory as a fresh clone has it after `make demo`, with a user's own base
    model, adapters and eval set laid out where the first sweep names them."""
    folder = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT / "jobs", folder / "jobs")
    shutil.copytree(demo_dir, folder / "raymerge-demo")
    return doc_examples.build_doc_world(folder)


def _run(command: str, cwd: Path, extra: list[str] = ()) -> str:
    """The command through the CLI's own entry point, in this process (already connected to the
    session's Ray instance, which `raymerge run` would join through RAY_ADDRESS), from `cwd`."""
    args = command.split()[1:] + list(extra)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(here)
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{command}: {result.exception!r}\n{output[-4000:]}"
    )
    assert result.exit_code == 0, f"{command}\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    return result.stdout


def test_every_doc_command_is_run_by_a_test():
    commands = _doc_commands()
    assert len(commands) >= 16
    pages = {block.page.relative_to(ROOT).as_posix() for block, _ in commands}
    assert {"README.md", "docs/quickstart.md"} <= pages, pages
    here = {"plan", "run", "report", "demo", "bench"}
    for block, command in commands:
        assert command in COVERED_ELSEWHERE or command.split()[1] in here, (block.where(), command)


def test_the_doc_commands_run_as_written(fresh_clone, ray_cluster):
    ran = []
    for block, command in _doc_commands():
        if command in COVERED_ELSEWHERE:
            continue
        _spec_file(block, command, fresh_clone)
        extra = SMALL_WORLD if command.strip() == "raymerge bench merge" else []
        if command.startswith("raymerge demo"):
            extra = TINY_DEMO
        if command.startswith("raymerge bench plan"):
            extra = ["--merges", "20000"]  # the same code path as 1,000,000, in a second
        if command == "raymerge report OUTPUT":
            command = "raymerge report raymerge-demo/local-sweep"  # OUTPUT of the run above
        stdout = _run(command, fresh_clone, extra)
        ran.append(command)
        if command.endswith("--json"):
            assert json.loads(stdout)["total"] == 15
        if command.strip() == "raymerge bench merge":
            assert "whole raymerge run" in stdout and "linear" in stdout, stdout
        if command.startswith("raymerge demo"):
            assert "Best merges by" in stdout and "Report: " in stdout
            assert "single adapter" in stdout  # the verdict
    # the quickstart's commands (7), and the first sweep of the README and the quickstart (3 each)
    assert len(ran) == 13, ran
    demo = read_manifest(str(fresh_clone / "raymerge-demo" / "merges-out"))
    assert len(demo) == 84 and all(line["status"] == "done" for line in demo)
    local = read_manifest(str(fresh_clone / "raymerge-demo" / "local-sweep"))
    assert len(local) == 15 and all(line["metrics"] for line in local)
    assert (fresh_clone / "raymerge-demo" / "local-sweep" / "report.html").exists()
    bench = fresh_clone / "raymerge-bench"  # the default, relative --out
    assert (bench / "world" / "adapters" / "adapter0" / "adapter_config.json").exists()
    # the first sweep on a user's own adapters: every merge scored, the files the pages list
    first = fresh_clone / "sweeps" / "first"
    lines = read_manifest(str(first))
    assert len(lines) == 18 and all(line["status"] == "done" and line["metrics"] for line in lines)
    for name in ("references.json", "summary.json", "leaderboard.csv", "report.html"):
        assert (first / name).is_file(), name
    merge = first / "merges" / lines[0]["merge_id"]
    assert {"adapter_model.safetensors", "adapter_config.json", "merge.json"} <= {
        p.name for p in merge.iterdir()
    }
