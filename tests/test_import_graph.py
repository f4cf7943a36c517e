"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle, no
function-level import of diffquant inside the modules the job flows through, no upward import from the
core into the zoo or the evaluation code.

Edges are the modules a file names: `from diffquant.a import b` is an edge to diffquant.a.b when that is
a module, else to diffquant.a. Parent packages whose `__init__` Python runs on the way are not edges
(every module would otherwise sit in one circle with diffquant/__init__.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffquant"

# Imports that `__init__` files make only so that modules register themselves (each points down into
# modules that import the registry they fill). They are the one kind of edge allowed to close a cycle;
# today none does, and the list keeps it that way for these and only these.
REGISTRATION_EDGES = {
    # fills the recipe stage registry (recipes.config) before any recipe is read: the algorithm modules
    # import recipes.config and the job module, so the registry cannot import them
    ("diffquant", "diffquant.algorithms"),
    # the algorithms package imports each method module, each registering its stages
    *(("diffquant.algorithms", f"diffquant.algorithms.{name}") for name in (
        "calibration_selection", "efficientdm", "qat", "range_search", "reconstruction", "smoothquant",
        "svdquant")),
    # role adapters of the diffusers model classes
    ("diffquant.arch", "diffquant.arch.diffusers_models"),
    # integer-GEMM backends
    *(("diffquant.kernels", f"diffquant.kernels.{name}") for name in (
        "avx2", "fbgemm", "float_fallback", "gpu_triton", "int_mm", "vnni")),
    # the zoo's model modules register their ZooEntry
    ("diffquant.zoo.models", "diffquant.zoo.models.fmnist_dit"),
    ("diffquant.zoo.models", "diffquant.zoo.models.fmnist_sd"),
}
# Imports made only for annotations (under `if TYPE_CHECKING:`), never executed, that close a circle of
# types: a recipe holds stages, a stage acts on the job, the job holds the recipe.
TYPE_ONLY_CYCLE_EDGES = {
    ("diffquant.recipes.config", "diffquant.job"),
}
# Cycles kept on purpose, each closed by the edge named, with why. The test checks every one still
# exists, so the list can only shrink.
PENDING_CYCLE_EDGES = {
    # The zoo's model modules register their ZooEntry when registry.get() first runs, not when the zoo
    # package is imported: they import diffusers' pipelines (diffquant's CLI starts in 2 s instead of 8,
    # without optional packages' warnings). A lazy registration import, kept on purpose.
    ("diffquant.zoo.registry", "diffquant.zoo.models"),
}
# Where the job flows: these import diffquant only at module level (a function-level import hides a cycle).
NO_FUNCTION_IMPORTS = ("diffquant.algorithms", "diffquant.recipes", "diffquant.checkpoint", "diffquant.freeze")
# Above the core: the reference models (zoo) and, above them, evaluation and the commands and workflows
# that combine everything (cli_args is not among them: argument types, no diffquant import).
ZOO = ("diffquant.zoo",)
TOP = ("diffquant.eval", "diffquant.demo", "diffquant.workflows", "diffquant.cli", "diffquant.selfcheck",
       "diffquant.__main__")


def is_command_module(name: str) -> bool:
    """`<feature>/cli_commands.py`: the feature's subcommands, registered with diffquant.cli (top level)."""
    return name.endswith(".cli_commands")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    in_function: bool
    type_only: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, in_function: bool = False, type_only: bool = False
             ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement under `node`, with whether a function or an `if TYPE_CHECKING:` holds it."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for part in child.body:
                yield from _imports(ast.Module(body=[part], type_ignores=[]), in_function, True)
            for part in child.orelse:
                yield from _imports(ast.Module(body=[part], type_ignores=[]), in_function, type_only)
        else:
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _imports(child, in_function or nested, type_only)


def _targets(statement: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names if within(alias.name, ("diffquant",))]
    base = statement.module or ""
    if statement.level or not within(base, ("diffquant",)):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in statement.names]


def import_edges() -> list[Edge]:
    known = modules()
    edges = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement, in_function, type_only in _imports(tree):
            edges += [Edge(name, target, statement.lineno, in_function, type_only)
                      for target in _targets(statement, known) if target != name]
    return edges


def strongly_connected(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycles(edges: list[Edge], allowed: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    return strongly_connected({(e.importer, e.imported) for e in edges
                               if not e.type_only and (e.importer, e.imported) not in allowed})


def function_level_imports(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if e.in_function and within(e.importer, NO_FUNCTION_IMPORTS)]


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Core modules importing the zoo or anything above it, and the zoo importing what sits above it."""
    def level(name: str) -> int:
        return 2 if within(name, TOP) or is_command_module(name) else 1 if within(name, ZOO) else 0

    return [e for e in edges if level(e.imported) > level(e.importer)]


def _where(edges: list[Edge]) -> list[str]:
    return [f"{e.importer}:{e.line} imports {e.imported}" for e in edges]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges()


def test_the_graph_is_read(edges: list[Edge]) -> None:
    """The reader sees the imports it must judge (else every check below passes on an empty graph)."""
    pairs = {(e.importer, e.imported) for e in edges}
    assert ("diffquant.api", "diffquant.job") in pairs
    assert any(e.in_function for e in edges)
    assert {(e.importer, e.imported) for e in edges if e.type_only} >= TYPE_ONLY_CYCLE_EDGES


def test_no_cycle_beyond_registration_imports(edges: list[Edge]) -> None:
    assert cycles(edges, REGISTRATION_EDGES | PENDING_CYCLE_EDGES) == []


def test_type_only_imports_close_no_other_cycle(edges: list[Edge]) -> None:
    """A circle of annotations is listed above, not hidden behind `if TYPE_CHECKING:`."""
    typed = [Edge(e.importer, e.imported, e.line, e.in_function, False) for e in edges]
    assert cycles(typed, REGISTRATION_EDGES | TYPE_ONLY_CYCLE_EDGES | PENDING_CYCLE_EDGES) == []


def test_allowed_edges_are_registrations_in_init_files_and_still_exist(edges: list[Edge]) -> None:
    """The allow-lists are no wider than needed: registration edges are made at module level by an
    `__init__` file; a pending edge that was fixed must leave its list."""
    known = modules()
    module_level = {(e.importer, e.imported) for e in edges if not e.in_function and not e.type_only}
    for importer, imported in REGISTRATION_EDGES:
        assert known[importer].name == "__init__.py" and (importer, imported) in module_level
    fixed = PENDING_CYCLE_EDGES - {(e.importer, e.imported) for e in edges if not e.type_only}
    assert fixed == set(), "fixed: take these out of PENDING_CYCLE_EDGES"


def test_no_function_level_diffquant_import_where_the_job_flows(edges: list[Edge]) -> None:
    assert _where(function_level_imports(edges)) == []


def test_dependencies_point_down_core_then_zoo_then_eval_and_commands(edges: list[Edge]) -> None:
    assert _where(upward_imports(edges)) == []


def test_checks_fail_on_a_planted_violation() -> None:
    planted = [Edge("diffquant.job", "diffquant.api", 1, False, False),
               Edge("diffquant.api", "diffquant.job", 1, False, False),
               Edge("diffquant.freeze", "diffquant.checkpoint", 1, True, False),
               Edge("diffquant.algorithms.qat", "diffquant.zoo.train_utils", 1, False, False),
               Edge("diffquant.zoo.training", "diffquant.eval", 1, False, False),
               Edge("diffquant.zoo.cli_commands", "diffquant.cli", 1, False, False),
               Edge("diffquant.eval.runner", "diffquant.zoo", 1, True, False)]
    assert cycles(planted) == [["diffquant.api", "diffquant.job"]]
    assert cycles(planted, {("diffquant.job", "diffquant.api")}) == []
    assert [e.importer for e in function_level_imports(planted)] == ["diffquant.freeze"]
    assert [e.importer for e in upward_imports(planted)] == ["diffquant.algorithms.qat", "diffquant.zoo.training"]
