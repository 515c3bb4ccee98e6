"""Registered loss terms. ``LOSS_TERMS`` imports every module of this package before its first lookup
(``repro.core.registry``), so a new method is one new file here (``@LOSS_TERMS.register("name")``) plus spec rows: no
list to edit."""
from __future__ import annotations

from repro.methods.base import LOSS_TERMS, Distiller, LossTerm, Outputs, TermContext


def get_term(name: str) -> type[LossTerm]:
    return LOSS_TERMS.get(name)


__all__ = ["LOSS_TERMS", "Distiller", "LossTerm", "Outputs", "TermContext", "get_term"]
