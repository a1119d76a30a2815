"""The documentation site: it builds with `mkdocs build --strict` (a broken link or anchor, or a
page missing from the nav, fails it), and its generated reference holds every spec key,
combination type and command the code has — a key added to the models appears in it."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import doc_examples
import pytest
import typer
import yaml
from pydantic import BaseModel, Field

from raymerge.cli import app
from raymerge.merge.registry import METHODS, PARAMS, Form, RankRule
from raymerge.sweep.spec import EvaluateSpec, SweepSpec
from raymerge.sweep.spec.types import FrozenModel

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "docs" / "hooks"


def _hook_modules() -> dict[str, Any]:
    """The generator's modules, imported as MkDocs imports its hook (its folder on sys.path)."""
    sys.path.insert(0, str(HOOKS))
    try:
        names = [
            "reference",
            "reference_text",
            "reference_spec",
            "reference_methods",
            "reference_cli",
        ]
        return {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(HOOKS))


HOOK = _hook_modules()


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def _sections(page: str) -> dict[str, str]:
    """A generated page's `## ... {#anchor}` sections, by anchor."""
    sections = {}
    for block in page.split("\n## ")[1:]:
        heading = block.split("\n", 1)[0]
        sections[heading.rsplit("{#", 1)[1].rstrip("}")] = block
    return sections


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    for page in ("reference/spec", "reference/methods", "reference/cli", "guides/methods"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    # the generated pages live only in the build, never as files that could go stale
    assert not [uri for uri in HOOK["reference"].PAGES if (ROOT / "docs" / uri).exists()]


def test_a_broken_link_anchor_or_page_fails_the_strict_build(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    index = tmp_path / "docs" / "index.md"
    index.write_text(
        index.read_text() + "\n[gone](no-such-page.md) and [no key](reference/spec.md#no-key)\n"
    )
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr, result.stderr
    assert "no-key" in result.stderr, result.stderr
    assert "orphan.md" in result.stderr, result.stderr


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models anywhere in an annotation (unions, lists, maps, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _reachable(root: type[BaseModel]) -> list[type[BaseModel]]:
    found, todo = [], [root]
    while todo:
        model = todo.pop()
        if model not in found:
            found.append(model)
            todo += [m for f in model.model_fields.values() for m in _models(f.annotation)]
    return found


def _assert_every_key_listed(root: type[BaseModel]) -> dict[str, str]:
    sections = _sections(HOOK["reference_spec"].spec_page(root))
    for model in _reachable(root):
        section = sections.get(model.__name__.lower())
        assert section is not None, f"{model.__name__} has no section"
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in section, f"{model.__name__}.{name} missing"
    return sections


def test_every_spec_key_is_in_the_spec_reference():
    sections = _assert_every_key_listed(SweepSpec)
    # the grid groups' discriminated union: both kinds, told apart by their keys
    assert "`combinations[]` with `adapters`" in sections["explicitgroup"]
    assert "`combinations[]` with `choose`" in sections["choosegroup"]
    # descriptions: attribute docstrings, and the registry's for the method parameters
    assert "Number of merge workers" in sections["sweepspec"]
    assert PARAMS["density"].doc in sections["methodspec"]
    assert "| `from` |" in sections["choosegroup"]  # the alias, not from_


def test_every_spec_key_has_a_description_in_the_reference():
    rows = [
        line
        for line in HOOK["reference_spec"].spec_page(SweepSpec).splitlines()
        if line.startswith("| `")
    ]
    assert len(rows) > 50  # the page has its tables
    assert not [row.split(" |")[0] for row in rows if row.endswith("| — |")]


class _Probe(FrozenModel):
    """A section that only this test has."""

    depth: int = Field(default=3, ge=1)
    """How deep the probe goes."""


class _ProbedEvaluate(EvaluateSpec):
    probe_metric: str = "loss"
    """A key added to an existing nested section."""


class _ProbedSpec(SweepSpec):
    probe: _Probe | None = None
    """A new section."""
    evaluate: _ProbedEvaluate | None = None


def test_a_key_added_to_the_models_appears_in_the_spec_reference():
    sections = _assert_every_key_listed(_ProbedSpec)
    assert "| `probe` | [_Probe](#_probe) | not set | A new section. |" in sections["_probedspec"]
    assert "| `depth` | integer (≥ 1) | `3` | How deep the probe goes. |" in sections["_probe"]
    assert "| `probe_metric` | string | `loss` | A key added" in sections["_probedevaluate"]


def test_every_combination_type_and_parameter_is_in_the_methods_reference():
    page = HOOK["reference_methods"].methods_page()
    sections = _sections(page)
    types = sections["peft-types"] + sections["own-types"]
    for name, method in METHODS.items():
        row = next((line for line in types.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert row, f"{name} missing"
        assert all(f"`{param}`" in row for param in method.params), row
        assert f"[{method.rank.value}](#rank-rules)" in row
    for name in PARAMS:
        assert f"| `{name}` |" in sections["parameters"]
    for value in [*RankRule, *Form]:
        assert f"| `{value.value}` |" in page


def _commands(command, path: str) -> list[tuple[str, Any]]:
    subs = getattr(command, "commands", {}).items()
    return [(path, command)] + [
        c for name, sub in subs if not sub.hidden for c in _commands(sub, f"{path} {name}")
    ]


def test_every_command_and_option_is_in_the_cli_reference():
    sections = _sections(HOOK["reference_cli"].cli_page())
    commands = _commands(typer.main.get_command(app), "raymerge")
    assert len(commands) > 10
    for path, command in commands:
        section = sections.get(path.replace(" ", "-"))
        assert section is not None, f"{path} has no section"
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                assert opt in section, f"{path}: {opt} missing"
            if getattr(param, "help", None):
                # the help's words up to the first character Markdown escapes
                assert re.split(r"[<>&|`]", " ".join(param.help.split()))[0][:40] in section


@pytest.mark.parametrize("text", ["a | b", "DIR/<id>/ & `x<y>`"])
def test_table_cells_survive_markdown(text):
    out = HOOK["reference_text"].cell(text)
    assert "|" not in out.replace("\\|", "")
    assert "<" not in out.replace("`x<y>`", "")


# The examples of the README and the documentation pages: every YAML or shell block is run (a
# spec planned here, a shell block's commands by test_readme_commands), checked offline, or
# marked illustrative (tests/doc_examples.py says how).


@pytest.fixture(scope="module")
def doc_world(tmp_path_factory) -> Path:
    return doc_examples.build_doc_world(tmp_path_factory.mktemp("doc-world"))


def example_problems(blocks: list[doc_examples.Block], world: Path) -> list[str]:
    """What is wrong with each YAML or shell block: a mark that is not one, a shell block that
    is run but holds more than raymerge commands, YAML that does not parse, or a spec (or part
    of one) that `raymerge plan` refuses (offline: that `raymerge submit` refuses)."""
    from raymerge.sweep.plan import load_plan, validate_offline

    problems = []
    for n, block in enumerate(blocks):
        where = block.where()
        if block.lang not in (*doc_examples.YAML, *doc_examples.SHELL):
            continue
        if block.mark is not None and (block.mark not in doc_examples.MARKS or not block.why):
            problems.append(f"{where}: <!-- {block.mark}: {block.why} --> is not a mark")
            continue
        if block.lang in doc_examples.SHELL:
            others = [c for c in block.commands() if not c.startswith("raymerge ")]
            if block.mark == "offline" or (block.mark is None and others):
                problems.append(
                    f"{where}: {(others or ['offline'])[0]!r}: test_readme_commands runs raymerge "
                    "commands only; mark the block <!-- illustrative: why -->"
                )
            continue
        try:
            example = yaml.safe_load(block.text)
        except yaml.YAMLError as exc:
            problems.append(f"{where}: not YAML: {' '.join(str(exc).split())}")
            continue
        if not isinstance(example, dict):
            problems.append(f"{where}: not a spec or a part of one")
            continue
        if block.mark == "illustrative":
            continue
        spec = world / f"example-{n}.yaml"
        spec.write_text(yaml.safe_dump(doc_examples.as_spec(example), sort_keys=False))
        try:
            (validate_offline if block.mark == "offline" else load_plan)(spec)
        except Exception as exc:  # a plan's refusal, or anything it raises instead
            problems.append(f"{where}: refused: {' '.join(str(exc).split())}")
    return problems


def test_every_yaml_and_shell_example_is_run_checked_or_marked_illustrative(doc_world):
    blocks = doc_examples.all_blocks()
    assert len([b for b in blocks if b.lang in doc_examples.YAML and b.mark is None]) >= 4
    problems = example_problems(blocks, doc_world)
    assert not problems, "\n".join(problems)
    # the first sweep's spec and commands, in the README and the quickstart, are run
    for page in ("README.md", "docs/quickstart.md"):
        run = [b for b in doc_examples.shell_blocks_run() if b.page == ROOT / page]
        assert any("raymerge run first-sweep.yaml" in b.commands() for b in run), page
        assert doc_examples.spec_before(run[0]) is not None, page


BROKEN_PAGE = """# A page with broken examples

```yaml
methods:
  - {combination_type: ties, densty: 0.5}
```

```yaml
evaluate:
  datasets: {missing: ./eval/missing.jsonl}
```

```bash
raymerge plan first-sweep.yaml
pip install raymerge
```

<!-- ilustrative: a typo -->
```yaml
adapters: [a, b
```

<!-- illustrative: fine -->
```yaml
search: {budget: not-a-number}
```

<!-- offline: names S3 -->
```yaml
adapters: {math: s3://bucket/adapters/math}
combinations:
  - {adapters: [math, nope], weights: [[1, 1]], methods: [{combination_type: linear}]}
```
"""


def test_a_broken_or_unmarked_example_is_reported(doc_world, tmp_path):
    page = tmp_path / "broken.md"
    problems = example_problems(doc_examples.blocks(page, BROKEN_PAGE), doc_world)
    assert len(problems) == 5, problems
    unknown, missing, shell, mark, offline = problems
    assert unknown.startswith(f"{page}:3: refused") and "densty" in unknown
    assert missing.startswith(f"{page}:8: refused") and "missing.jsonl" in missing
    assert shell.startswith(f"{page}:13: 'pip install raymerge'")
    assert mark.startswith(f"{page}:19: <!-- ilustrative: a typo -->")
    assert offline.startswith(f"{page}:29: refused") and "nope" in offline


MAKE = re.compile(r"`(make [^`]*)`|^(make [^\n#]*)", re.M)


def test_the_make_commands_name_the_makefile_targets_and_variables():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    variables = set(re.findall(r"^(\w+) \?=", makefile, re.M))
    commands = [
        c
        for page in doc_examples.pages()
        for m in MAKE.finditer(page.read_text())
        for c in m.groups()
        if c
    ]
    assert {"make demo", "make test"} <= {c.strip() for c in commands}
    for command in commands:
        for word in command.split()[1:]:
            if "=" in word:
                assert word.split("=")[0] in variables, command
            else:
                assert word in targets, command


def test_the_readme_links_lead_to_pages_and_headings_that_exist():
    from markdown.extensions.toc import slugify

    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text())
    local = [(path or "README.md", anchor) for path, anchor in links if "://" not in path]
    assert len(local) >= 10
    for path, anchor in local:
        assert (ROOT / path).exists(), path
        if anchor:
            headings = re.findall(r"^#+ (.+?)(?: \{#[^}]*\})?$", (ROOT / path).read_text(), re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"{path}#{anchor}"
