"""The package's import structure, read from the source (nothing is imported): imports run one
way, adapters -> core, tools (``cli``, ``demo``, ``evaluate``) -> core, and no module-level import
closes a circle. A core module that imported an adapter or a tool would drag an optional framework
(fastreid, timm, PML, matplotlib) into ``import feature_cloud``."""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: where each installed package's sources live (pyproject's package-dir)
SOURCES = {"feature_cloud": "feature_cloud", "feature_cloud.integrations": "integrations"}
#: modules that may use the rest of the package: the tools and the adapters
TOOLS = (
    "feature_cloud.cli",
    "feature_cloud.__main__",
    "feature_cloud.demo",
    "feature_cloud.evaluate",
)
ADAPTERS = ("feature_cloud.integrations",)


def _modules() -> Dict[str, Tuple[str, bool]]:
    """``{module name: (file, is_package)}`` of every source module of the installed package."""
    found: Dict[str, Tuple[str, bool]] = {}
    for package, folder in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    is_pkg = name == "__init__.py"
                    module = prefix if is_pkg else f"{prefix}.{name[:-3]}"
                    found[module] = (os.path.join(dirpath, name), is_pkg)
    return found


MODULES = _modules()


def _imports(module: str, top_level_only: bool) -> Iterator[str]:
    """The package modules ``module`` imports (``from pkg import name`` counts as ``pkg.name``
    where that is a module, else as ``pkg``); ``top_level_only``: not inside functions."""
    file, is_pkg = MODULES[module]
    with open(file, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), file)
    package = module if is_pkg else module.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            yield child
            yield from visit(child)

    for node in visit(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c: the deepest package module
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def _is_in(module: str, groups: Tuple[str, ...]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def test_the_sources_are_found():
    assert {"feature_cloud", "feature_cloud.heads", "feature_cloud.evaluate.runner"} <= set(MODULES)
    assert {"feature_cloud.integrations.pml", "feature_cloud.integrations.fastreid"} <= set(MODULES)
    assert "feature_cloud.cloud" in set(_imports("feature_cloud.heads", top_level_only=True))


def test_the_core_imports_no_adapter_and_no_tool():
    """Anywhere in a core module, functions included: the core never reaches up."""
    bad = {
        (module, target)
        for module in MODULES
        if not _is_in(module, TOOLS + ADAPTERS)
        for target in _imports(module, top_level_only=False)
        if _is_in(target, TOOLS + ADAPTERS)
    }
    assert not bad, sorted(bad)


def test_adapters_import_no_tool():
    bad = {
        (module, target)
        for module in MODULES
        if _is_in(module, ADAPTERS)
        for target in _imports(module, top_level_only=False)
        if _is_in(target, TOOLS)
    }
    assert not bad, sorted(bad)


def test_no_module_level_import_circle():
    graph: Dict[str, Set[str]] = {m: set(_imports(m, top_level_only=True)) for m in MODULES}
    state: Dict[str, int] = {}  # 1: on the path, 2: done
    path: list = []

    def dfs(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(
                    "import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt])
                )
            if nxt not in state:
                dfs(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module)


def test_the_circle_check_sees_a_circle(monkeypatch):
    """The check itself: a made-up circle between two core modules is reported."""
    real = _imports

    def fake(module: str, top_level_only: bool) -> Iterator[str]:
        yield from real(module, top_level_only)
        if module == "feature_cloud.angles":
            yield "feature_cloud.heads"

    monkeypatch.setitem(globals(), "_imports", fake)
    try:
        test_no_module_level_import_circle()
    except AssertionError as exc:
        assert "feature_cloud.angles" in str(exc) and "feature_cloud.heads" in str(exc)
    else:
        raise AssertionError("the made-up circle was not found")
