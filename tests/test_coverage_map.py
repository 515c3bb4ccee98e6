"""`make test` skips the slow tests (`-m "not slow"`): every module of repro/ must still be loaded by a fast one.

Static, from the source (no test runs): a test module counts when it has at least one test that is not marked
slow; what it imports outside its slow tests (at module level, in fixtures, helpers and fast tests) is loaded, and
so is everything those modules import when they are loaded (their module-level imports; an import inside a function
runs only when that function does, so it does not count). A test that runs ``python -m repro`` loads the package's
``__main__``.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "repro"
TESTS = ROOT / "tests"


def repro_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow`` (called or not), alone or in a list of marks."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_slow_mark(elt) for elt in node.elts)
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr == "slow" \
        and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"


def _module_is_slow(tree: ast.Module) -> bool:
    """``pytestmark = pytest.mark.slow`` (or a list holding it) at module level."""
    return any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                     for t in node.targets) and _is_slow_mark(node.value)
               for node in tree.body)


def _slow(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
        and any(_is_slow_mark(d) for d in node.decorator_list)


def _fast_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node outside the slow tests (and slow test classes)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _slow(child))


def _has_fast_test(tree: ast.Module) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
               for node in _fast_nodes(tree))


def _imported(nodes: Iterable[ast.AST], here: str, known: dict[str, Path]) -> set[str]:
    """The repro modules named by the import statements among ``nodes`` (``here``: the importing module, for
    relative imports); ``from package import name`` names the submodule when ``name`` is one."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, here)
            if base is None:
                continue
            found |= _with_parents(base, known)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return found


def _absolute(node: ast.ImportFrom, here: str) -> Optional[str]:
    """The module an import-from names; None for a relative import (repro has none; tests/ may)."""
    return None if node.level else node.module


def _with_parents(name: str, known: dict[str, Path]) -> set[str]:
    """Importing a.b.c loads a, a.b and a.b.c."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known}


def _runs_main(tree: ast.Module) -> bool:
    """The test starts ``python -m repro`` (as a list ``[..., "-m", "repro", ...]`` or in one command string)."""
    for node in _fast_nodes(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if any(a == "-m" and b == "repro" for a, b in zip(values, values[1:])):
                return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "-m repro" in node.value:
            return True
    return False


def loaded_by_fast_tests() -> tuple[set[str], dict[str, set[str]]]:
    """The repro modules the fast tests load, and for each test module the ones it imports itself."""
    known = repro_modules()
    direct: dict[str, set[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        if _module_is_slow(tree) or not _has_fast_test(tree):
            continue
        names = _imported(_fast_nodes(tree), f"tests.{path.stem}", known)
        if _runs_main(tree):
            names |= {"repro", "repro.__main__"}
        direct[path.name] = names
    top_level = {name: _loads(name, path, known) for name, path in known.items()}
    loaded: set[str] = set()
    pending = [name for names in direct.values() for name in names]
    while pending:
        name = pending.pop()
        if name not in loaded:
            loaded.add(name)
            pending.extend(top_level[name])
    return loaded, direct


def _loads(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """What loading a module loads: its module-level imports (not those inside functions, which run only when
    called), plus what its registry loads on first use: every submodule of a package that discovers them
    (``Registry(..., package=...)``, as repro.methods' loss terms do), and every repro module named by a module-level
    string (a lazy family list such as repro.models' ``_FAMILIES``)."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    nodes = list(_module_level(tree))
    loads = _imported(nodes, name, known)
    loads |= {node.value for node in nodes if isinstance(node, ast.Constant) and node.value in known}
    for package in _discovered_packages(nodes, name, source):
        loads |= {other for other in known if other.rpartition(".")[0] == package}
    return loads


def _discovered_packages(nodes: list[ast.AST], name: str, source: str) -> set[str]:
    """Packages whose every module this one imports on first use: a ``Registry(..., package=...)`` it creates
    (repro.core.registry's one discovery rule), or a package ``__init__`` importing ``f"{__name__}.{...}"``."""
    packages = set()
    for node in nodes:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Registry":
            for keyword in node.keywords:
                if keyword.arg == "package":
                    value = keyword.value
                    if isinstance(value, ast.Name) and value.id == "__name__":
                        packages.add(name)
                    elif isinstance(value, ast.Constant) and isinstance(value.value, str):
                        packages.add(value.value)
    if 'import_module(f"{__name__}.' in source:
        packages.add(name)
    return packages


def _module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """Module-level statements, descending into if/try/with blocks but not into functions."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        if isinstance(node, ast.ClassDef):
            stack.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif not isinstance(node, (ast.Import, ast.ImportFrom)):
            stack.extend(ast.iter_child_nodes(node))


# Modules the command line and the logger registry import inside functions (so that `repro --help` stays fast),
# with the fast test module that drives them, and the call that reaches them; the test checks both are still there.
REACHED_LAZILY = {
    "repro.harness.bundles": ("test_bundles.py", 'main(["export"'),
    "repro.harness.inventory": ("test_bundles.py", 'main(["runs"'),
    "repro.train.loggers.tensorboard": ("test_loggers.py", '"tensorboard")'),
    "repro.train.loggers.wandb": ("test_loggers.py", '"wandb")'),
}


def test_every_repro_module_is_loaded_by_a_fast_test() -> None:
    loaded, direct = loaded_by_fast_tests()
    for module, (test_file, call) in REACHED_LAZILY.items():
        assert test_file in direct, f"{test_file} (which reaches {module}) has no fast test any more"
        assert call in (TESTS / test_file).read_text(), f"{test_file} no longer calls {call} (reaching {module})"
        loaded.add(module)
    missing = sorted(set(repro_modules()) - loaded)
    assert not missing, (f"these modules of repro/ are loaded by no test outside the slow ones (`make test` skips "
                         f"those): {', '.join(missing)}; import them from a fast test")


def test_the_map_sees_slow_marks_and_lazy_imports(tmp_path) -> None:
    """The checker itself: a slow test's import does not count, a fast one's does, a function-level import inside
    a repro module is not followed."""
    source = ("import pytest\nfrom repro.harness.store import RunStore\n\n@pytest.mark.slow\ndef test_a():\n"
              "    import repro.bench\n\ndef test_b():\n    from repro.core import registry\n")
    tree = ast.parse(source)
    known = repro_modules()
    names = _imported(_fast_nodes(tree), "tests.test_x", known)
    assert {"repro", "repro.harness.store", "repro.core.registry"} <= names and "repro.bench" not in names
    assert _has_fast_test(tree) and not _module_is_slow(tree)
    assert _module_is_slow(ast.parse("import pytest\npytestmark = [pytest.mark.slow]\n"))
    lazy = ast.parse("import os\ndef f():\n    import repro.bench\n")
    assert _imported(_module_level(lazy), "repro.x", known) == set()
    assert _runs_main(ast.parse("def test_c():\n    run([sys.executable, '-m', 'repro', 'plan'])\n"))
