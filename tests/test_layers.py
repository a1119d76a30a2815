"""The package's shape, checked: layers import only downward, no import circles, no module uses
another's private names, the merge core knows neither Ray nor storage, and modules and functions
stay small enough to have one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raymerge"
LAYERS = ["merge", "store", "load", "score", "sweep", "cluster", "report", "demo", "bench", "cli"]
"""Bottom to top; the package's own root modules (errors, task) are below them all."""
RAY_AND_STORAGE = ("ray", "fsspec", "s3fs", "botocore", "boto3", "aiobotocore")
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1]) + 1
    return len(LAYERS) + 1 if parts[-1] == "__main__" else 0


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) of every import, top-level or inside a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [alias.name for alias in node.names]
            # `from raymerge.merge import format` imports the module raymerge.merge.format (its
            # package only as the way there)
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if len(submodules) < len(names):
                found.append((node.module, names))
            found += [(module, []) for module in submodules]
    return found


def _edges() -> dict[str, set[str]]:
    return {
        name: {m for m, _ in _imports(tree) if m in MODULES and m != name}
        for name, tree in TREES.items()
    }


def test_layers_import_only_downward():
    upward = [
        f"{importer} imports {imported}"
        for importer, targets in _edges().items()
        for imported in targets
        if _layer(imported) > _layer(importer)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges = _edges()
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_no_module_uses_another_modules_private_names():
    found = []
    for name, tree in TREES.items():
        aliases = {}  # local name -> raymerge module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module in MODULES:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and node.module != name:
                        found.append(f"{name} imports {node.module}.{alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


def test_the_merge_core_knows_neither_ray_nor_storage():
    found = [
        f"{name} imports {module}"
        for name, tree in TREES.items()
        if name.startswith("raymerge.merge")
        for module, _ in _imports(tree)
        if module.split(".")[0] in RAY_AND_STORAGE
    ]
    assert not found, "\n".join(found)


def test_only_the_store_knows_fsspec_and_s3fs():
    found = [
        f"{name} imports {module}"
        for name, tree in TREES.items()
        if not name.startswith("raymerge.store")
        for module, _ in _imports(tree)
        if module.split(".")[0] in ("fsspec", "s3fs")
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_are_small(module):
    source = MODULES[module].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{module}: split it by job"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(TREES[module])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: " + ", ".join(long)


def test_the_checks_read_imports_as_python_does():
    """Nested imports and `from package import module` count (so the checks cannot pass by
    seeing nothing), and the layers rank as documented."""
    assert (
        _layer("raymerge.task") < _layer("raymerge.merge.core") < _layer("raymerge.store.publish")
    )
    assert _layer("raymerge.cluster.worker") < _layer("raymerge.cli.app")
    tree = ast.parse("def f():\n    from raymerge.cluster import worker\n")
    assert ("raymerge.cluster.worker", []) in _imports(tree)
    assert {"raymerge.merge.engines", "raymerge.merge.tensors"} <= _edges()["raymerge.merge.core"]
