"""The `opd` package's import graph: the task side does not import the LM side, and no modules import each other in a
circle (import order bugs, and modules that cannot be understood or tested one at a time).

The graph is read from the source with `ast`, so it includes imports inside functions, which run later but still
tie the modules together; imports under `if TYPE_CHECKING:` are left out, as they never run.
"""

import ast
from pathlib import Path

import networkx as nx

import opd

CYCLE_ALLOWED_THROUGH: frozenset[str] = frozenset()
"""Modules whose cycles are tolerated (none: keep it that way)."""

FORBIDDEN_FOR_TASKS = ("opd.lm", "opd.control")
"""Packages `opd.tasks` must not reach, directly or through other modules: tasks are data, a tokenizer, a checker
and model configs, which the LM and control sides build on."""


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under `root`, the directory of `package` (`__init__.py` names the
    package itself)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST):
    """Every node under `node`, except the bodies of `if TYPE_CHECKING:` (their `else` runs, so it is kept)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
        else:
            yield from _runtime_nodes(child)


def imported_modules(name: str, path: Path, modules: set[str]) -> dict[str, int]:
    """Modules of `modules` that module `name` (file `path`) imports at run time -> line of the first such import.

    `from a import b` counts as importing `a.b` when that is a module, else `a`; `import a.b.c` counts as importing
    the longest prefix of `a.b.c` that is a module. Parent packages run first, but are not counted, as import tools
    do: else every module would seem to import its package's `__init__`, which imports it back.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, line)

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` climbs level - 1 packages above this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)
    return found


def import_graph(root: Path, package: str) -> nx.DiGraph:
    """Directed graph importer -> imported over the modules of `package` (found in directory `root`); each edge
    carries the `line` of the import."""
    names = module_names(root, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for name, path in names.items():
        for target, line in imported_modules(name, path, set(names)).items():
            graph.add_edge(name, target, line=line)
    return graph


def describe_cycle(graph: nx.DiGraph, cycle: list[str]) -> str:
    steps = [f"{a} (line {graph.edges[a, b]['line']})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    return " -> ".join(steps + [cycle[0]])


def cycles(graph: nx.DiGraph, allowed_through: frozenset[str] = frozenset()) -> list[str]:
    """One line per import cycle (shortest first) that passes through none of `allowed_through`."""
    kept = graph.subgraph(set(graph) - allowed_through)
    found = sorted((sorted_cycle(c) for c in nx.simple_cycles(kept)), key=lambda c: (len(c), c))
    return [describe_cycle(graph, c) for c in found]


def sorted_cycle(cycle: list[str]) -> list[str]:
    """The cycle rotated to start at its smallest name, so that reports are stable."""
    i = cycle.index(min(cycle))
    return cycle[i:] + cycle[:i]


OPD_GRAPH = import_graph(Path(opd.__file__).parent, "opd")


def test_graph_sees_imports_in_functions_and_relative_ones_but_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\nelse:\n    import os\n"
                "def f():\n    from .sub import c\n",
        "b.py": "import pkg.sub.c.thing\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import b\nfrom ..a import f\nimport json\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert set(graph.edges) == {("pkg", "pkg.a"), ("pkg.a", "pkg.sub.c"), ("pkg.b", "pkg.sub.c"),
                                ("pkg.sub.c", "pkg.b"), ("pkg.sub.c", "pkg.a")}
    assert graph.edges["pkg.a", "pkg.sub.c"]["line"] == 7
    assert cycles(graph) == ["pkg.a (line 7) -> pkg.sub.c (line 2) -> pkg.a",
                             "pkg.b (line 1) -> pkg.sub.c (line 1) -> pkg.b"]
    assert cycles(graph, allowed_through=frozenset({"pkg.b"})) == ["pkg.a (line 7) -> pkg.sub.c (line 2) -> pkg.a"]


def test_the_task_side_does_not_import_the_lm_or_control_side():
    bad = []
    for name in OPD_GRAPH:
        if name == "opd.tasks" or name.startswith("opd.tasks."):
            for target in nx.descendants(OPD_GRAPH, name):
                if any(target == p or target.startswith(p + ".") for p in FORBIDDEN_FOR_TASKS):
                    path = nx.shortest_path(OPD_GRAPH, name, target)
                    bad.append(" -> ".join(f"{a} (line {OPD_GRAPH.edges[a, b]['line']})"
                                           for a, b in zip(path, path[1:])) + f" -> {target}")
    print("\n".join(bad))
    assert not bad, "opd.tasks reaches the LM or control side:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(OPD_GRAPH, allowed_through=CYCLE_ALLOWED_THROUGH)
    print("\n".join(found))
    assert not found, "import cycles (each: importer (line of the import) -> imported ...):\n" + "\n".join(found)
