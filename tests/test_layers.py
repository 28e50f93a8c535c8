"""pdctl's layers, written once: each package and loose module under pdctl/ is a node, each node sits in one
layer, and a node imports only from its own layer or the layers below it, never in a cycle.

The graph is read from the source (ast), not by importing, so it sees every import however it is reached.
An import inside a function still counts (it is a dependency all the same); one under `if TYPE_CHECKING:`
does not (it never runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pdctl"

# Bottom first. A new module or package goes in the lowest layer whose imports it needs.
LAYERS: list[tuple[str, frozenset[str]]] = [
    # The design document's types, the errors a user acts on, and the package itself.
    ("types", frozenset({"pdctl", "types", "errors"})),
    # Small services that know nothing of a cluster: files, sockets, HTTP, counters, secrets, devices.
    (
        "utilities",
        frozenset(
            {
                "auth",
                "cost",
                "gpus",
                "health",
                "httpserver",
                "metrics",
                "ports",
                "procs",
                "safetext",
                "state",
                "strictjson",
                "tokentiming",
                "yaml_source",
            }
        ),
    ),
    # The profile and what is computed from it: the plan, placement, engine command lines, the engine model, and
    # the routing strategies and phase policies a profile names (`routing`: checked against the registries the router
    # builds from).
    ("pieces", frozenset({"engines", "perfmodel", "placement", "plan", "profile", "routing", "templates"})),
    # What runs a cluster: where instances run, their state machine, the router, the scaler.
    ("runtime", frozenset({"cluster", "launchers", "replan", "router", "scaling", "supervisor"})),
    # The processes that hold a cluster up, and `up`/`down`.
    ("daemon", frozenset({"daemon", "lifecycle", "watchdog"})),
    # The commands: parsing, printing and the tools behind `bench` and `simulate`.
    ("commands", frozenset({"__main__", "bench", "cli", "dashboard", "simulate", "views"})),
    # The design document's public API; nothing inside pdctl imports it.
    ("api", frozenset({"control_plane"})),
]
LAYER_OF = {node: rank for rank, (_, nodes) in enumerate(LAYERS) for node in nodes}

# Imports that break the rule today, as (importer, imported) nodes. This set may only shrink: the test fails
# on a violation not listed here, and on a listed one that no longer exists, so the list stays exact.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    source: str  # the importing file, relative to the repository
    line: int
    importer: str  # nodes
    imported: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line} ({self.importer} -> {self.imported})"


def node_of(module: str) -> str:
    """The node of a dotted module name under pdctl: its package or loose module, or the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "pdctl"
    name = parts[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name
    return "pdctl"  # a name defined in pdctl/__init__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(node: ast.AST, package: str) -> Iterator[tuple[str, int]]:
    """Every module an import statement under `node` names, lazy ones included, type-only ones left out."""
    if isinstance(node, ast.If) and is_type_checking(node.test):
        for child in node.orelse:
            yield from imported_modules(child, package)
        return
    if isinstance(node, ast.Import):
        yield from ((alias.name, node.lineno) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        # `from pdctl import stats` names a module; `from pdctl.x import name` names pdctl.x.
        yield from ((f"{base}.{alias.name}", node.lineno) for alias in node.names)
    for child in ast.iter_child_nodes(node):
        yield from imported_modules(child, package)


def package_imports() -> list[Import]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        importer = node_of(module)
        for name, line in imported_modules(ast.parse(path.read_text(), str(path)), package):
            if name.split(".")[0] != "pdctl":
                continue
            imported = node_of(name)
            if imported != importer:
                found.append(Import(str(path.relative_to(PACKAGE.parent)), line, importer, imported))
    return found


def nodes() -> set[str]:
    return {node_of(module_name(path)) for path in PACKAGE.rglob("*.py")}


def against_layers(imports: list[Import]) -> list[Import]:
    return [i for i in imports if LAYER_OF[i.imported] > LAYER_OF[i.importer]]


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.importer, set()).add(i.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            if component:
                found.append(sorted([*component, node]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_node_has_one_layer() -> None:
    placed = [node for _, members in LAYERS for node in members]
    assert len(placed) == len(set(placed)), "a node is in two layers"
    assert nodes() - set(placed) == set(), "place each new package or module in LAYERS"
    assert set(placed) - nodes() == set(), "LAYERS names a node that no longer exists"


def test_imports_go_down_the_layers() -> None:
    found = against_layers(package_imports())
    unlisted = [str(i) for i in found if (i.importer, i.imported) not in KNOWN_VIOLATIONS]
    gone = KNOWN_VIOLATIONS - {(i.importer, i.imported) for i in found}
    assert unlisted == [], "imports from a higher layer: move what they need down"
    assert gone == set(), "fixed: remove these from KNOWN_VIOLATIONS"


def test_no_two_nodes_import_each_other() -> None:
    assert cycles(package_imports()) == []


def test_nothing_inside_imports_the_public_api() -> None:
    assert [str(i) for i in package_imports() if i.imported == "control_plane"] == []


def test_the_reader_sees_lazy_imports_and_skips_type_only_ones() -> None:
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pdctl.router.pool import Pool\n"
        "def f():\n    from pdctl.perfmodel.arch import get_model\n"
        "from . import phase\n"
    )
    assert list(imported_modules(source, "pdctl.router")) == [
        ("typing.TYPE_CHECKING", 1),
        ("pdctl.perfmodel.arch.get_model", 5),
        ("pdctl.router.phase", 6),
    ]
    assert [node_of(name) for name in ("pdctl.perfmodel.arch.get_model", "pdctl.router", "pdctl.__version__")] == [
        "perfmodel",
        "router",
        "pdctl",
    ]


def test_the_rule_catches_an_import_against_the_layers_and_a_cycle() -> None:
    upward = Import("pdctl/profile.py", 1, "profile", "router")
    back = Import("pdctl/router/pool.py", 1, "router", "profile")
    assert against_layers([upward, back]) == [upward]
    assert cycles([upward, back]) == [["profile", "router"]]
