"""No import cycles inside irpo/: modules form layers, each importing only from below.

The graph is read from the source with ``ast``, not by importing: every ``import`` and
``from ... import`` statement counts wherever it stands (module level, inside a function,
under ``if TYPE_CHECKING``), and so does ``importlib.import_module("irpo....")`` with a
literal name, since a deferred or by-string import is still a dependency. A package's
``__init__`` is its own node; importing ``irpo.a.b`` is an edge to ``irpo.a.b`` only (the
parent package runs first, but that is how packages work, not a cycle of ours).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str = "irpo") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name``'s source imports, anywhere in it."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this one
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            found.add(node.args[0].value)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, package: str = "irpo") -> dict[str, set[str]]:
    names = module_names(root, package)
    known = set(names)
    return {name: imported(ast.parse(path.read_text(), str(path)), name,
                           path.name == "__init__.py", known)
            for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(graph, set(c)) for c in components]


def _path_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself (for the message)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a real component


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    """Module-level, function-level, relative, from-package-import-submodule, by literal name."""
    pkg = tmp_path / "irpo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("import irpo.sub.b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('irpo.a')\nimport json\n")
    (pkg / "d.py").write_text("from irpo import c\nfrom irpo.sub import nothing_here\n")
    graph = import_graph(tmp_path)
    assert graph == {"irpo": set(), "irpo.a": {"irpo.sub.b"}, "irpo.c": {"irpo.a"},
                     "irpo.d": {"irpo.c", "irpo.sub"}, "irpo.sub": {"irpo.sub.b"},
                     "irpo.sub.b": {"irpo.a"}}
    assert cycles(graph) == [["irpo.a", "irpo.sub.b", "irpo.a"]]
    assert cycles({"x": {"x"}, "y": set()}) == [["x", "x"]]


def test_no_import_cycles_in_irpo():
    graph = import_graph(ROOT)
    assert len(graph) > 40 and graph["irpo.driver"], "the graph reader found too little"
    found = cycles(graph)
    if found:
        pytest.fail("import cycles in irpo/ (a module must not import, even inside a "
                    "function, one that imports it back):\n"
                    + "\n".join(" -> ".join(c) for c in found))
