"""One discovery rule for every registry: ``Registry(kind, package=...)`` imports each module of the package once,
before the first lookup, and the modules register themselves with the decorator."""
from __future__ import annotations

import importlib
import sys

import pytest

from repro.core.errors import ReproError
from repro.core.registry import Registry


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """A throw-away package ``plugins_demo`` with two modules that register into ``REG`` when imported."""
    package = tmp_path / "plugins_demo"
    package.mkdir()
    (package / "__init__.py").write_text("from repro.core.registry import Registry\nREG = Registry('widget', package=__name__)\n")
    for name in ("alpha", "beta"):
        (package / f"{name}.py").write_text(f"from plugins_demo import REG\n\n@REG.register('{name}')\ndef make():\n"
                                            f"    return '{name}'\n")
    # sys.path by hand: syspath_prepend also calls pkg_resources, which a test sharing this worker may have stubbed
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    importlib.invalidate_caches()
    yield
    for module in [m for m in sys.modules if m == "plugins_demo" or m.startswith("plugins_demo.")]:
        del sys.modules[module]


def test_a_package_registry_discovers_its_modules_on_first_lookup(plugin_package):
    import plugins_demo

    assert "plugins_demo.alpha" not in sys.modules  # nothing imported before a name is asked for
    assert plugins_demo.REG.get("beta")() == "beta"
    assert plugins_demo.REG.names() == ["alpha", "beta"] and "alpha" in plugins_demo.REG


def test_an_unknown_name_is_one_error_listing_the_known_ones(plugin_package):
    import plugins_demo

    with pytest.raises(ReproError, match=r"unknown widget 'gamma'; known: alpha, beta"):
        plugins_demo.REG.get("gamma")


def test_a_registry_without_a_package_holds_what_its_module_registers():
    reg: Registry[int] = Registry("number")
    reg.register("one")(1)
    assert reg.names() == ["one"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one")(2)


@pytest.mark.parametrize("module, registry, member", [
    ("repro.methods", "LOSS_TERMS", "wttm"), ("repro.models", "MODELS", "resnet8x4"),
    ("repro.data", "DATASETS", "cifar100"), ("repro.data.pipelines", "PIPELINES", "cifar_transfer"),
    ("repro.train.loggers", "LOGGERS", "tensorboard")])
def test_the_suites_registries_discover_their_packages(module, registry, member):
    import importlib

    assert member in getattr(importlib.import_module(module), registry)
