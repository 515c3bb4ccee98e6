"""A name -> factory registry, in the spirit of timm's model registry, with one discovery rule for all of them.

Models, loss terms (methods), datasets, data pipelines, run loggers and evaluation suites register themselves with
a decorator (``@REGISTRY.register("name")``) in the module that defines them. A registry created with
``package="repro.x"`` imports every module of that package once, before its first lookup, so adding an entry is
adding one file: no list to edit, and nothing is imported until a name is asked for (``repro --help`` stays fast).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from repro.core.errors import ReproError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: Optional[str] = None) -> None:
        self.kind = kind
        self.package = package  # whose modules register entries here (imported on the first lookup)
        self._discovered = package is None
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` (defaults to the object's ``__name__``)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def discover(self) -> None:
        """Import every module of ``package`` once (sub-packages import their own modules), so that each registers
        its entries."""
        if self._discovered:
            return
        self._discovered = True  # first: a module being imported may already look a name up
        assert self.package is not None
        package = importlib.import_module(self.package)
        try:
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
        except BaseException:
            self._discovered = False  # a module that failed to import is retried (and fails loudly) next time
            raise

    def get(self, name: str) -> T:
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ReproError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        self.discover()
        return sorted(self._entries.items())
