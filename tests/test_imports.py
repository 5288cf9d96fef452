"""No import circles among our modules. Checked on the source (ast), so an import inside a function or under
``TYPE_CHECKING`` counts too: a circle hidden that way still couples two modules both ways, and moving one
import to the top (or a type checker evaluating it) brings the circle back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["storage", "scheduler", "offload"]

KNOWN_EDGES: dict[tuple[str, str], str] = {}
"""Edges left out of the check, each with why and what removes it. Keep this empty but for a reason."""


def _modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted name -> file, for every module of ``packages`` under ``root`` (a package is its ``__init__``)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that module ``name`` imports anywhere in its source.

    ``from pkg import x`` is an edge to ``pkg.x`` when that is a module, else to ``pkg`` (its ``__init__``).
    The implicit import of parent packages (``import a.b`` runs ``a/__init__``) is not counted: every submodule
    would otherwise be in a circle with a package ``__init__`` that re-exports it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        if target in modules and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            add(str(node.args[0].value))
    return found


def import_graph(root: Path = ROOT, packages: list[str] = PACKAGES) -> dict[str, set[str]]:
    modules = _modules(root, packages)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]], skip=frozenset()) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or ``None``; edges in ``skip`` are left out."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if (m, n) in skip:
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"storage.tiers", "scheduler.cost", "offload.runtime"} <= graph.keys(), "the checker found no modules"
    cycle = find_cycle(graph, skip=frozenset(KNOWN_EDGES))
    assert cycle is None, ("import circle: " + " -> ".join(cycle) + ". Move what both sides need into a module that "
                           "imports neither (as storage/units.py and scheduler/plan.py do), or have the lower one "
                           "take it as an argument")


def test_known_edges_still_exist():
    graph = import_graph()
    gone = [f"{a} -> {b}" for a, b in KNOWN_EDGES if b not in graph.get(a, set())]
    assert not gone, f"no longer imported, so remove from KNOWN_EDGES in {__file__}: {gone}"
    for a, b in KNOWN_EDGES:  # and each known edge is still the only thing closing its circle
        assert find_cycle(graph, skip=frozenset(KNOWN_EDGES) - {(a, b)}) is not None, \
            f"{a} -> {b} closes no circle any more: remove it from KNOWN_EDGES"


def test_checker_sees_every_form(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from p.a import f\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import B\n"
                              "def f():\n    pass\n")
    (pkg / "b.py").write_text("def g():\n    from p import c\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('p.d')\n")
    (pkg / "d.py").write_text("from . import a\nimport os\n")
    graph = import_graph(tmp_path, ["p"])
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.d"}, "p.d": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.d", "p.a"]
    assert find_cycle(graph, skip=frozenset({("p.d", "p.a")})) is None
