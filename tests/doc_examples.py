"""The code examples of the README and the documentation pages (docs/**/*.md), for the tests that
check and run them. Every YAML or shell block is one of:

- **run**: a YAML block is a sweep spec, or a part of one (set into a whole spec first), planned
  with `raymerge plan` in a small world laid out as the examples name it (test_docs); a shell
  block holds `raymerge ...` commands only, and test_readme_commands runs each of them, in a
  folder holding a fresh clone after `make demo` and that world. A command's spec that is not in
  that folder is the page's last whole spec (a YAML block with `base_model` and `output`) before
  the command;
- **offline** (`<!-- offline: why -->` on the line before it, for specs that name S3 or the
  Hub): its keys, values and cross-key rules are checked as `raymerge submit` checks them before
  anything leaves the machine, without reading any input;
- **illustrative** (`<!-- illustrative: why -->`): not run; a YAML block must still parse.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHELL = ("bash", "sh", "shell", "console")
YAML = ("yaml", "yml")
MARKS = ("illustrative", "offline")
MARK = re.compile(r"^<!--\s*(\w+)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """The opening fence's line, from 1."""
    lang: str
    text: str
    mark: str | None = None
    """`illustrative` or `offline` (or a misspelt mark, which the checks refuse), or None: run."""
    why: str = ""
    """The reason the mark gives."""

    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    def commands(self) -> list[str]:
        """A shell block's commands: its lines without comments, blank lines left out."""
        lines = (line.split(" #")[0].rstrip() for line in self.text.splitlines())
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pages() -> list[Path]:
    """The README and every documentation page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of `page` (or of `text`, as that page), each with the mark on the last
    non-blank line before it, if that line is an HTML comment."""
    lines = (page.read_text() if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, ticks, lang = fence.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        mark = MARK.match(before)
        found.append(
            Block(
                page,
                i + 1,
                lang.lower(),
                "\n".join(body) + "\n",
                mark[1] if mark else None,
                (mark[2] or "") if mark else "",
            )
        )
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page)]


def shell_blocks_run() -> list[Block]:
    """The shell blocks that test_readme_commands runs: every unmarked one, page by page."""
    return [b for b in all_blocks() if b.lang in SHELL and b.mark is None]


def is_whole(example: Any) -> bool:
    """A whole spec names its base model and its output; anything else is a part of one."""
    return isinstance(example, dict) and "base_model" in example and "output" in example


def spec_before(block: Block) -> Block | None:
    """The page's last whole spec before `block`."""
    import yaml

    specs = [
        b
        for b in blocks(block.page)
        if b.lang in YAML and b.line < block.line and is_whole(yaml.safe_load(b.text))
    ]
    return specs[-1] if specs else None


# The world the examples name: the base model, the adapters and the eval sets, by these paths.
ADAPTERS = ("math", "code", "chat")
EVAL_SETS = {
    "heldout.jsonl": [
        {"text": f"A held-out sentence, number {i}, about adding {i}+{i}."} for i in range(8)
    ],
    "math.jsonl": [{"text": f"{i}+{i}={2 * i}"} for i in range(8)],
    "qa.jsonl": [
        {"prompt": f"{i}+1=", "choices": [str(i + 1), str(i)], "answer": 0} for i in range(8)
    ],
    "gen.jsonl": [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)],
}
WHOLE = {
    "base_model": "./models/base",
    "adapters": {name: f"./adapters/{name}" for name in ADAPTERS},
    "combinations": [
        {"choose": 2, "weights": [[1.0, 1.0]], "methods": [{"combination_type": "linear"}]}
    ],
    "evaluate": {
        "datasets": {
            "math": "./eval/math.jsonl",
            "qa": {"path": "./eval/qa.jsonl", "kind": "choice"},
            "gen": {"path": "./eval/gen.jsonl", "kind": "generate"},
        }
    },
    "output": "./out",
}
"""The whole spec that a part of one is set into (its keys replace these, section by section)."""


def build_doc_world(root: Path) -> Path:
    """The world the examples name, under `root`: ./models/base (a 64-wide Llama with a
    tokenizer), ./adapters/{math,code,chat} (r=8) and ./eval/*.jsonl. A few seconds."""
    from raymerge.demo.world import AdapterShape, build_adapter, build_base_model

    base = build_base_model(root / "models" / "base")
    for seed, name in enumerate(ADAPTERS, start=1):
        build_adapter(base, root / "adapters" / name, AdapterShape(r=8), seed=seed)
    (root / "eval").mkdir(exist_ok=True)
    for name, rows in EVAL_SETS.items():
        (root / "eval" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _merged(whole: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    out = dict(whole)
    for key, value in part.items():
        both = isinstance(value, dict) and isinstance(whole.get(key), dict)
        out[key] = _merged(whole[key], value) if both else value
    return out


def as_spec(example: dict[str, Any]) -> dict[str, Any]:
    """A YAML example as a whole spec: itself if whole; a part of the top level set into WHOLE;
    a part of a combination group (`methods:`, `weights:`) set into WHOLE's group."""
    from raymerge.sweep.spec import SweepSpec

    if is_whole(example):
        return example
    top = {field.alias or name for name, field in SweepSpec.model_fields.items()}
    if set(example) <= top:
        return _merged(WHOLE, example)
    spec = copy.deepcopy(WHOLE)
    spec["combinations"][0].update(example)
    return spec
