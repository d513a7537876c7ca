"""The package's import graph (#16, "a newcomer can follow the core"): no import circles, and the core packages
import alone.

The graph is read from the sources with ``ast``, never by importing them: every ``import`` / ``from ... import``
anywhere in a module (module level, inside functions, under ``TYPE_CHECKING``; relative imports resolved), a literal
``import_module("robustft.x")`` / ``__import__("robustft.x")``, and the registries' ``"robustft.x:Class"`` strings
(a lazy import is still an import). Importing ``robustft.a.b`` also runs ``robustft/a/__init__.py``, so an edge to
a module is an edge to each package above it too, except the importer's own packages (Python has run those first).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robustft"
_MODULE_STRING = re.compile(r"^(robustft(?:\.\w+)+)(?::\w+)?$")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Module name -> source file for every module of ``package`` (a package is its ``__init__.py``)."""
    files = {}
    for file in sorted(package.rglob("*.py")):
        parts = file.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return files


def imported_names(module: str, source: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` imports, anywhere in it (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..a import b
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)  # import_module("robustft.x"), "robustft.x:Class" registries
            if match:
                names.add(match.group(1))
    return names


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the modules of the package that importing it runs directly (packages on the way included)."""
    files = module_files() if files is None else files
    graph = {}
    for module, file in files.items():
        edges = set()
        for name in imported_names(module, file.read_text(), file.name == "__init__.py"):
            parts = name.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = edges - {module} - own_packages
    return graph


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of modules that import each other directly."""
    return sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at least one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (about 70)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


# ------------------------------------------------------------------------------------------------------ the walker


def test_the_walk_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "robustft"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import a\n")
    (package / "sub" / "a.py").write_text("def f():\n    from .b import thing\n")  # function level, relative
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    import robustft.c\n")
    (package / "c.py").write_text("REGISTRY = {'x': 'robustft.sub.b:Thing'}\n")  # a registry string
    (package / "d.py").write_text("from robustft.sub import a\n")
    graph = import_graph(module_files(package))
    assert graph == {
        "robustft": set(),
        "robustft.sub": {"robustft.sub.a"},
        "robustft.sub.a": {"robustft.sub.b"},
        "robustft.sub.b": {"robustft.c"},
        "robustft.c": {"robustft.sub", "robustft.sub.b"},  # importing robustft.sub.b runs robustft/sub/__init__
        "robustft.d": {"robustft.sub", "robustft.sub.a"},
    }
    assert mutual_imports(graph) == [("robustft.c", "robustft.sub.b")]
    assert import_circles(graph) == [["robustft.c", "robustft.sub", "robustft.sub.a", "robustft.sub.b"]]
    longer = {**graph, "robustft.c": {"robustft.sub"}}  # c -> sub -> a -> b -> c
    assert mutual_imports(longer) == [] and import_circles(longer) == [
        ["robustft.c", "robustft.sub", "robustft.sub.a", "robustft.sub.b"]]
    acyclic = {**longer, "robustft.sub.b": set()}
    assert mutual_imports(acyclic) == [] and import_circles(acyclic) == []


# ----------------------------------------------------------------------------------------------------- the package


def test_the_walk_covers_the_package():
    graph = import_graph()
    assert len(graph) == len(list(PACKAGE.rglob("*.py"))) > 50
    # edges the walk must see: module level, a package's re-exports, a registry string, a function-level import
    assert "robustft.methods.base" in graph["robustft.methods.l2sp"]
    assert "robustft.methods.ewc" in graph["robustft.methods"]
    assert "robustft.data.imagenet" in graph["robustft.data.registry"]
    assert "robustft.backbones.efficientnet" in graph["robustft.backbones"]
    assert sum(len(edges) for edges in graph.values()) > 150


def test_no_two_modules_import_each_other():
    assert mutual_imports(import_graph()) == []


def test_no_import_circle_of_any_length():
    assert import_circles(import_graph()) == []


def test_the_methods_never_reach_the_trainer():
    """The trainer calls the methods' hooks; a method reaches only the training context (what it is handed)."""
    graph = import_graph()
    for method in (m for m in graph if m.startswith("robustft.methods")):
        seen, todo = set(), [method]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        assert not seen & {"robustft.training.trainer", "robustft.training.run"}, (method, sorted(seen))


@pytest.mark.parametrize("package", ["robustft.data", "robustft.methods", "robustft.training"])
def test_each_core_package_imports_alone(package):
    """``import robustft.<package>`` in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


_EACH_FIRST = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "robustft" or m.startswith("robustft.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first():
    """Each module of the package as the first of the package imported (the others unloaded before it, third-party
    packages kept: one interpreter): no module works only when another was imported before it, the order an import
    circle hides."""
    modules = sorted(module_files())
    result = subprocess.run([sys.executable, "-c", _EACH_FIRST, *modules], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
