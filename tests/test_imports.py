"""The import graphs of `opd` and `benchmarks`: the task side does not import the LM side, `opd.lm`'s sub-packages
import only the layers below them, no modules import each other in a circle (import order bugs, and modules that
cannot be understood or tested one at a time), and no module imports another's private (`_x`) names.

The graph is read from the source with `ast`, so it includes imports inside functions, which run later but still
tie the modules together. Imports under `if TYPE_CHECKING:` never run, but they tie two modules' meanings together
all the same: the cycle and layer checks count them too.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

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


def _runtime_nodes(node: ast.AST, type_checking: bool = False):
    """Every node under `node`, except (unless `type_checking`) the bodies of `if TYPE_CHECKING:` (their `else` runs,
    so it is kept)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
        else:
            yield from _runtime_nodes(child, type_checking)


def imported_modules(name: str, path: Path, modules: set[str], type_checking: bool = False) -> dict[str, int]:
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

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path)), type_checking):
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


def import_graph(root: Path, package: str, type_checking: bool = False) -> nx.DiGraph:
    """Directed graph importer -> imported over the modules of `package` (found in directory `root`); each edge
    carries the `line` of the import. `type_checking`: count imports under `if TYPE_CHECKING:` too."""
    names = module_names(root, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for name, path in names.items():
        for target, line in imported_modules(name, path, set(names), type_checking).items():
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


OPD_ROOT = Path(opd.__file__).parent
BENCHMARKS_ROOT = OPD_ROOT.parent / "benchmarks"
OPD_GRAPH = import_graph(OPD_ROOT, "opd")
TYPED_GRAPHS = {"opd": import_graph(OPD_ROOT, "opd", type_checking=True),
                "benchmarks": import_graph(BENCHMARKS_ROOT, "benchmarks", type_checking=True)}

LM_LAYERS = (
    ("opd.lm.batch", "opd.lm.hf", "opd.lm.data"),
    ("opd.lm.teachers", "opd.lm.xtok", "opd.lm.serve", "opd.lm.diagnostics"),
    ("opd.lm.remote",),
    ("opd.lm.rollouts",),
    ("opd.lm.loop", "opd.lm.eval"),
    ("opd.lm.train",),
    ("opd.lm.recipes",),
)
"""`opd.lm`'s parts, lowest first: a module may import its own part and the parts of lower layers, never a part of
its own layer or above (DEVELOPERS.md draws the same order)."""


def lm_part(module: str) -> tuple[str, int] | None:
    """(the part of `LM_LAYERS` that holds `module`, its layer), or None outside opd.lm's parts."""
    for layer, parts in enumerate(LM_LAYERS):
        for part in parts:
            if module == part or module.startswith(part + "."):
                return part, layer
    return None


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


@pytest.mark.parametrize("package", ["opd", "benchmarks"])
def test_no_import_cycles_type_checking_imports_included(package):
    found = cycles(TYPED_GRAPHS[package], allowed_through=CYCLE_ALLOWED_THROUGH)
    print("\n".join(found))
    assert not found, "import cycles (each: importer (line of the import) -> imported ...):\n" + "\n".join(found)


def test_every_lm_module_sits_in_a_layer():
    loose = [m for m in OPD_GRAPH if m.startswith("opd.lm.") and lm_part(m) is None]
    assert not loose, f"add these to LM_LAYERS: {loose}"


def test_lm_parts_import_only_lower_layers():
    graph = TYPED_GRAPHS["opd"]
    bad = []
    for a, b in graph.edges:
        pa, pb = lm_part(a), lm_part(b)
        if pa and pb and pa[0] != pb[0] and pb[1] >= pa[1]:
            bad.append(f"{a} (line {graph.edges[a, b]['line']}) -> {b}: layer {pa[1]} imports layer {pb[1]}")
    assert not bad, "upward or sideways imports in opd.lm:\n" + "\n".join(bad)


def private_imports(root: Path, package: str) -> list[str]:
    """`file:line name` for each `from <package>... import _name` (a private name of another module)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package:
                found += [f"{path.relative_to(root.parent)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("package", ["opd", "benchmarks"])
def test_no_module_imports_another_modules_private_names(package):
    root = {"opd": OPD_ROOT, "benchmarks": BENCHMARKS_ROOT}[package]
    found = private_imports(root, package)
    assert not found, "make these public (and document them) or keep them in their module:\n" + "\n".join(found)


def test_private_imports_are_found(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import _hidden, public\nfrom pkg.c import __version__\n")
    assert private_imports(tmp_path / "pkg", "pkg") == ["pkg/a.py:1 _hidden"]
