"""Registered loss terms. Every module in this package is imported on first use, so a new method is
one new file here (``@LOSS_TERMS.register("name")``) plus spec rows: no list to edit."""
from __future__ import annotations

import importlib
import pkgutil

from repro.methods.base import LOSS_TERMS, Distiller, LossTerm, Outputs, TermContext

_discovered = False


def discover() -> None:
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def get_term(name: str) -> type[LossTerm]:
    discover()
    return LOSS_TERMS.get(name)


__all__ = ["LOSS_TERMS", "Distiller", "LossTerm", "Outputs", "TermContext", "discover", "get_term"]
