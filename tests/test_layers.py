"""Dependencies point one way: cli -> harness/analyses -> train -> methods/models/data -> losses -> core.

The import graph of ``repro/`` is read with ``ast`` (nothing is imported): every ``import repro...`` and
``from repro... import ...`` counts, at module level and inside functions alike, because a function-level import
is still a dependency (it only defers it). Imports under ``if TYPE_CHECKING:`` are left out: they are annotations,
never executed. A registry's package discovery (``repro.core.registry``) is not an import edge: the registry imports
modules that depend on it, not the other way round. Importing ``repro.a.b`` also runs ``repro/a/__init__.py``;
that implicit edge is not counted (a package's ``__init__`` is judged by its own imports).

``LAYER_OF`` maps today's flat modules to the layer their target package belongs to (issue 12's layout); after
the move to packages it becomes the package names themselves.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

REPRO = Path(__file__).resolve().parents[1] / "repro"

# Layers from the top; a module may import its own layer and any layer below it.
LAYERS = ("cli", "harness", "train", "middle", "losses", "core")
# Inside the middle layer, methods may use models and data; models and data use neither methods nor each other.
MIDDLE_ALLOWED = {("methods", "models"), ("methods", "data")}

# Longest matching prefix wins: (layer, sub-layer for the middle layer).
LAYER_OF: dict[str, tuple[str, str]] = {
    "repro": ("core", ""),  # the package docstring
    "repro.__main__": ("cli", ""),
    "repro.cli": ("cli", ""),
    "repro.api": ("cli", ""),  # the Python entry point beside the CLI
    "repro.papers": ("harness", ""),  # paper discovery, and each paper's figure definitions (they register there)
    "repro.harness": ("harness", ""),
    "repro.analyses": ("harness", ""),  # evaluation suites: the harness's layer
    "repro.train": ("train", ""),
    "repro.methods": ("middle", "methods"),
    "repro.models": ("middle", "models"),
    "repro.data": ("middle", "data"),
    "repro.losses": ("losses", ""),
    "repro.core": ("core", ""),
}

# Known violations that other branches of issue 12 remove; the lead empties this at merge. Each entry is an import
# edge (importer, imported) with who fixes it.
EXPECTED_TO_BE_FIXED_ELSEWHERE: dict[tuple[str, str], str] = {}  # none left: the redesign fixed them all


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPRO.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(REPRO.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, outside ``if TYPE_CHECKING:`` blocks (their ``else`` branch still counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repro modules ``name`` imports: ``from repro.a import b`` is ``repro.a.b`` when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: resolved against this module's package
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            found.add(sub if sub in modules else source)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> tuple[str, str]:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYER_OF:
            return LAYER_OF[prefix]
    raise KeyError(module)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path (first == last), or [] when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def allowed(importer: str, imported: str) -> bool:
    (top, top_sub), (low, low_sub) = layer_of(importer), layer_of(imported)
    if LAYERS.index(top) > LAYERS.index(low):
        return False
    if top == low == "middle" and top_sub != low_sub:
        return (top_sub, low_sub) in MIDDLE_ALLOWED
    return True


def violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if not allowed(a, b))


# -- tests ---------------------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    unmapped = []
    for name in all_modules():
        try:
            layer_of(name)
        except KeyError:
            unmapped.append(name)
    assert not unmapped, f"give these modules a layer in LAYER_OF: {unmapped}"


def test_the_import_graph_of_repro_is_acyclic():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
    found = violations(import_graph())
    unexpected = [f"{a} ({'/'.join(filter(None, layer_of(a)))}) imports {b} ({'/'.join(filter(None, layer_of(b)))})"
                  for a, b in found if (a, b) not in EXPECTED_TO_BE_FIXED_ELSEWHERE]
    assert not unexpected, "imports against the layer order:\n" + "\n".join(unexpected)


# -- the checker itself ---------------------------------------------------------------------------------------
def _graph_of(tmp_path: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    root = tmp_path / "repro"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setattr(f"{__name__}.REPRO", root)
    return import_graph()


def test_function_level_imports_count_and_type_checking_imports_do_not(tmp_path, monkeypatch):
    graph = _graph_of(tmp_path, {
        "__init__.py": "",
        "core/errors.py": "def f():\n    from repro.harness.spec import X\n",
        "harness/spec.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from repro.harness.plan import P\n",
        "harness/plan.py": "from repro.harness import spec\n",
    }, monkeypatch)
    assert graph["repro.core.errors"] == {"repro.harness.spec"} and graph["repro.harness.spec"] == set()
    assert graph["repro.harness.plan"] == {"repro.harness.spec"}
    assert find_cycle(graph) == []
    assert violations(graph) == [("repro.core.errors", "repro.harness.spec")]  # core must not import the harness


def test_a_cycle_is_found_and_named(tmp_path, monkeypatch):
    graph = _graph_of(tmp_path, {
        "__init__.py": "",
        "harness/spec.py": "def f():\n    from repro.harness.plan import resolve\n",
        "harness/plan.py": "from repro.harness.spec import Spec\n",
    }, monkeypatch)
    assert find_cycle(graph) == ["repro.harness.plan", "repro.harness.spec", "repro.harness.plan"]


def test_data_may_not_import_methods(tmp_path, monkeypatch):
    graph = _graph_of(tmp_path, {
        "__init__.py": "", "methods/__init__.py": "", "methods/base.py": "",
        "data/__init__.py": "", "data/loader.py": "from repro.methods.base import Batch\n",
    }, monkeypatch)
    assert violations(graph) == [("repro.data.loader", "repro.methods.base")]

