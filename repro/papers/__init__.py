"""Papers: each is one folder ``<root>/<paper>/`` holding ``specs/*.yaml`` (its tables and figure runs) and,
optionally, ``figures.py`` (its figure definitions, registered with ``repro.harness.render.figure_steps.figure``).

The roots are this package's folder, then every folder of ``$REPRO_PAPERS`` (``os.pathsep``-separated), so a new
paper can live outside the tree and is found with no generic module touched. A spec's id is
``<paper>/<path under specs/ without .yaml>`` (``wttm/cifar100-table1``); files starting with ``_`` are shared
bases (``base: wttm/_cifar100``), not specs. Nothing here imports the rest of ``repro``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from repro.core.errors import ReproError

BUILTIN_ROOT = Path(__file__).parent
ENV = "REPRO_PAPERS"  # extra paper roots, os.pathsep-separated


def paper_roots() -> list[Path]:
    """Where papers are looked for: the built-in folder, then ``$REPRO_PAPERS`` (read on every call)."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    for root in extra:
        if not root.is_dir():
            raise ReproError(f"${ENV}: {root} is not a folder")
    return [BUILTIN_ROOT, *extra]


def paper_dirs() -> dict[str, Path]:
    """Paper name -> its folder (a folder with ``specs/`` or ``figures.py``), in name order; a name found in two
    roots is refused (which one a spec id meant would depend on the environment)."""
    papers: dict[str, Path] = {}
    for root in paper_roots():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            if not ((folder / "specs").is_dir() or (folder / "figures.py").is_file()):
                continue
            if folder.name in papers:
                raise ReproError(f"paper {folder.name!r} is in two places: {papers[folder.name]} and {folder}")
            papers[folder.name] = folder
    return dict(sorted(papers.items()))


def spec_files() -> dict[str, Path]:
    """Spec id -> YAML file for every spec and shared base of every paper."""
    files: dict[str, Path] = {}
    for paper, folder in paper_dirs().items():
        specs = folder / "specs"
        if specs.is_dir():
            for path in sorted(specs.rglob("*.yaml")):
                files[f"{paper}/{path.relative_to(specs).with_suffix('').as_posix()}"] = path
    return files


EXTERNAL_MODULE = "repro_paper_{paper}_figures"  # the module name of a figures.py outside the package


def load_figure_modules() -> list[str]:
    """Import every paper's ``figures.py`` (once each), so that its figures are registered; returns their module
    names. Built-in papers are imported as ``repro.papers.<paper>.figures``; others from their file."""
    loaded = []
    for paper, folder in paper_dirs().items():
        path = folder / "figures.py"
        if not path.is_file():
            continue
        if folder.parent == BUILTIN_ROOT:
            name = f"{__name__}.{paper}.figures"
            importlib.import_module(name)
        else:
            name = EXTERNAL_MODULE.format(paper=paper)
            _import_file(name, path)
        loaded.append(name)
    return loaded


def is_paper_module(module: str) -> bool:
    """Whether ``module`` is a paper's figure module (as opposed to shared code registering figures)."""
    return module.startswith(f"{__name__}.") or (module.startswith("repro_paper_") and module.endswith("_figures"))


def _import_file(name: str, path: Path) -> None:
    """A paper module outside the package, imported from its file; the same file is imported only once."""
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")) == path:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ReproError(f"cannot import the figure definitions {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
