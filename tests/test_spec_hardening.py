"""Hostile and careless specs: every one is refused quickly, with exit 2, one line per problem
naming the key (or line), no traceback, no secret echoed, and nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import base_spec, free_port, write_spec
from typer.testing import CliRunner

from raymerge.cli import app

runner = CliRunner()


def _raymerge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real command in its own process: a hang fails the test by its timeout."""
    return subprocess.run(
        [sys.executable, "-m", "raymerge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )


def _refused(result, *parts: str) -> str:
    output = result.stdout + result.stderr if hasattr(result, "stderr") else result.output
    code = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert code == 2, output
    assert "Traceback" not in output, output
    for part in parts:
        assert part in output, f"{part!r} not in {output!r}"
    return output


def _yaml_spec(world, tmp_path: Path, extra: str) -> Path:
    """A valid spec as YAML text, with `extra` appended (hostile YAML cannot go through dumps)."""
    path = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    path.write_text(path.read_text() + extra)
    return path


def _alias_bomb(key: str) -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) values once expanded."""
    lines = ["bomb0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 9):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"bomb{level}: &l{level} [{refs}]")
    lines.append(f"{key}: {{x: *l8}}" if key == "storage_options" else f"{key}: *l8")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", ["workers", "storage_options"])
def test_a_yaml_alias_bomb_is_refused_at_once(world, tmp_path, key):
    path = write_spec(tmp_path, {k: v for k, v in base_spec(world, tmp_path / "out").items()
                                 if k != key})  # fmt: skip
    path.write_text(path.read_text() + _alias_bomb(key))
    for command in ("plan", "run"):
        result = _raymerge(command, str(path))
        _refused(result, "YAML", "aliases", "200,000 values")
    assert not (tmp_path / "out").exists()


def test_recursive_aliases_and_deep_nesting_are_refused(world, tmp_path):
    result = runner.invoke(app, ["plan", str(_yaml_spec(world, tmp_path, "loop: &a [*a]\n"))])
    _refused(result, "refers to itself")
    deep = "deep: " + "[" * 20000 + "]" * 20000 + "\n"
    result = runner.invoke(app, ["plan", str(_yaml_spec(world, tmp_path, deep))])
    _refused(result, "nested too deeply")


def test_a_duplicate_key_anywhere_is_named_with_its_lines(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    path = write_spec(tmp_path, spec)
    text = path.read_text().replace(
        "adapters:\n", f"adapters:\n  b: {world.adapters['c']}\n", 1
    )  # `b` twice under adapters: YAML would keep the later one silently
    path.write_text(text)
    output = _refused(runner.invoke(app, ["plan", str(path)]), "duplicate key 'b'", "line")
    assert output.count("\n") <= 3  # one problem, one line (wrapped at most)

    nested = write_spec(tmp_path, spec, "nested.yaml")
    nested.write_text(
        nested.read_text().replace(
            "- combination_type: linear",
            "- combination_type: linear\n    combination_type: cat",
        )
    )
    _refused(runner.invoke(app, ["plan", str(nested)]), "duplicate key 'combination_type'")
    assert not (tmp_path / "out").exists()


def test_one_location_under_two_names_is_refused(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["adapters"]["twin"] = str(world.adapters["a"]) + "/"
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    _refused(result, "adapters: a, twin name the same location")


@pytest.mark.parametrize("case", ["inside an adapter", "inside the base model", "a file", "blank"])
def test_an_output_that_is_not_a_folder_of_its_own_is_refused(world, tmp_path, case):
    spec = base_spec(world, tmp_path / "out")
    if case == "inside an adapter":
        spec["output"] = str(world.adapters["b"] / "merges-here")
        expected = ["output:", "inside the folder of adapter 'b'"]
    elif case == "inside the base model":
        spec["output"] = str(world.base_model)
        expected = ["output:", "inside the folder of base_model"]
    elif case == "a file":
        (tmp_path / "taken").write_text("not a folder")
        spec["output"] = str(tmp_path / "taken")
        expected = ["output:", "is an existing file"]
    else:
        spec["output"] = "   "
        expected = ["output:", "blank"]
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, spec))])
    _refused(result, *expected)
    assert not (world.adapters["b"] / "merges-here").exists()
    assert not (world.base_model / "merges").exists()
    assert (tmp_path / "taken").read_text() == "not a folder" if case == "a file" else True


def test_weights_that_overflow_float32_are_refused(world, tmp_path):
    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["weights"] = [[0.5, 0.5], [1e39, 1.0], [1.0, -1e300]]
    result = runner.invoke(app, ["plan", str(write_spec(tmp_path, spec))])
    output = _refused(result, "combinations[0].weights", "weights[1][0] = 1e+39", "float32")
    assert "1e+300" not in output  # the first problem of a key is enough to act on


def test_a_yaml_syntax_error_never_echoes_the_line(world, tmp_path):
    secret = "wJalrXUtnFEMI-K7MDENG-NEVER-ECHO"
    path = write_spec(tmp_path, base_spec(world, tmp_path / "out"))
    path.write_text(path.read_text() + f"storage_options: {{key: {secret}\n")
    result = runner.invoke(app, ["plan", str(path)])
    output = _refused(result, "not valid YAML", "line")
    assert secret not in output


def test_submit_validates_the_spec_before_anything_leaves(world, tmp_path):
    """No cluster listens at this address: only a local refusal can explain exit 2."""
    secret = "AKIA-SHOULD-NEVER-LEAVE"
    spec = base_spec(world, tmp_path / "out", storage_options={"secret": secret})
    address = f"http://127.0.0.1:{free_port()}"
    result = _raymerge("submit", str(write_spec(tmp_path, spec)), "--address", address)
    output = _refused(result, "storage_options: secret would put a credential")
    assert secret not in output and "cannot reach" not in output

    spec = base_spec(world, tmp_path / "out")
    spec["combinations"][0]["weights"] = [[1.0]]
    result = _raymerge("submit", str(write_spec(tmp_path, spec, "b.yaml")), "--address", address)
    _refused(result, "combinations[0].weights[0]", "give one weight per adapter")


def test_an_empty_or_oversized_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    _refused(runner.invoke(app, ["plan", str(empty)]), "must be a YAML mapping")
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(17 * 2**20)
    _refused(runner.invoke(app, ["plan", str(huge)]), "larger than 16 MB")
    shutil.rmtree(tmp_path, ignore_errors=True)
