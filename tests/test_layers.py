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


def _from(node: ast.ImportFrom, importer: str | None, package: bool = False) -> str:
    """The absolute module of `from ... import`: a relative one (`from . import x`, `from ..y
    import z`) resolved from the importing module `importer` (`package`: it is a package's
    __init__, so `.` is itself), as Python resolves it."""
    if not node.level:
        return node.module or ""
    if importer is None:
        raise ValueError(f"a relative import ({ast.unparse(node)}) needs its importing module")
    parts = importer.split(".") if package else importer.split(".")[:-1]
    if node.level - 1 >= len(parts):
        raise ValueError(f"{importer}: {ast.unparse(node)} goes above the top-level package")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_package(name: str) -> bool:
    return name in MODULES and MODULES[name].name == "__init__.py"


def _imports(
    tree: ast.AST, importer: str | None = None, package: bool | None = None
) -> list[tuple[str, list[str]]]:
    """(module, names) of every import, top-level or inside a function, relative ones resolved
    from `importer` (the module whose tree it is)."""
    if package is None:
        package = importer is not None and _is_package(importer)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from(node, importer, package)
            names = [alias.name for alias in node.names]
            # `from raymerge.merge import format` imports the module raymerge.merge.format (its
            # package only as the way there)
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if len(submodules) < len(names):
                found.append((module, names))
            found += [(m, []) for m in submodules]
    return found


def _edges() -> dict[str, set[str]]:
    return {
        name: {m for m, _ in _imports(tree, name) if m in MODULES and m != name}
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


def _own_attributes(tree: ast.AST) -> set[str]:
    """The attributes the module's own classes define: in a class body (methods, properties,
    class attributes) or assigned as `self.x` / `cls.x`."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    own.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else []
                if isinstance(item, ast.AnnAssign):
                    targets = [item.target]
                own |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            own.add(node.attr)
    return own


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(name: str, tree: ast.AST, package: bool | None = None) -> list[str]:
    """Where module `name` uses another module's private names: imports them, or reaches one
    through any object (`writer._pending`, `module._helper`, `a.b._c`), `self` and `cls` aside,
    unless the name is one its own classes define (an object of a class of this module)."""
    found = []
    own = _own_attributes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _from(node, name, _is_package(name) if package is None else package)
            for alias in node.names:
                if (
                    _private(alias.name)
                    and module != name
                    and f"{module}.{alias.name}" not in MODULES
                ):
                    found.append(f"{name}:{node.lineno} imports {module}.{alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            and node.attr not in own
        ):
            found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [use for name, tree in TREES.items() for use in _private_uses(name, tree)]
    assert not found, "\n".join(found)


def test_the_merge_core_knows_neither_ray_nor_storage():
    found = [
        f"{name} imports {module}"
        for name, tree in TREES.items()
        if name.startswith("raymerge.merge")
        for module, _ in _imports(tree, name)
        if module.split(".")[0] in RAY_AND_STORAGE
    ]
    assert not found, "\n".join(found)


def test_only_the_store_knows_fsspec_and_s3fs():
    found = [
        f"{name} imports {module}"
        for name, tree in TREES.items()
        if not name.startswith("raymerge.store")
        for module, _ in _imports(tree, name)
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


def test_relative_imports_are_read_as_absolute_ones():
    """`from . import x` and `from ..y import z` count as the modules they name, so an upward
    import cannot hide behind dots."""
    tree = ast.parse("from . import tensors\nfrom ..store import manifest\nfrom .. import task\n")
    found = {module for module, _ in _imports(tree, "raymerge.merge.core")}
    assert {"raymerge.merge.tensors", "raymerge.store.manifest", "raymerge.task"} <= found
    # In a package's __init__, `.` is the package itself.
    tree = ast.parse("from .fast import FastEngine\n")
    assert ("raymerge.merge.engines.fast", ["FastEngine"]) in _imports(
        tree, "raymerge.merge.engines", package=True
    )
    with pytest.raises(ValueError, match="above the top-level package"):
        _imports(ast.parse("from .... import x\n"), "raymerge.merge.core")


def test_the_private_check_sees_reach_ins_through_objects():
    """Private names reached through another module's objects are found; `self`, `cls`, dunders
    and this module's own classes' attributes are not."""
    source = """
from raymerge.store.manifest import ManifestWriter
from ..store import _hidden
from . import tensors

class Own:
    _limit = 3

    def __init__(self):
        self._count = 0

    def same(self, other: Own):
        return other._count + Own._limit + self._count + self.__class__.__name__.__len__()

def reach(writer: ManifestWriter):
    writer._pending.result()
    return tensors._helper(), writer.flush()._state
"""
    found = _private_uses("raymerge.merge.core", ast.parse(source))
    assert sorted(found) == [
        "raymerge.merge.core:16 uses writer._pending",
        "raymerge.merge.core:17 uses tensors._helper",
        "raymerge.merge.core:17 uses writer.flush()._state",
        "raymerge.merge.core:3 imports raymerge.store._hidden",
    ], found
