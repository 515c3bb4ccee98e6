"""Declared value domains of loss-term parameters, checked once when a spec loads (``repro.harness.spec``).

A term lists its parameters' domains as data (``LossTerm.domains = {"temperature": POSITIVE, ...}``), so the
load-time check is one loop over every term, not code per method: a temperature of 0, a negative gamma or a
warm-up longer than the schedule is refused before any run starts, with one line naming the field and value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return _number(value) and float(value).is_integer()


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


@dataclass(frozen=True)
class Domain:
    """What values a parameter may take: ``accepts(value)``, described by ``text`` in the refusal."""

    text: str
    accepts: Callable[[Any], bool]
    within_epochs: bool = False  # an epoch count: also at most the run's epochs

    def problem(self, value: Any, epochs: Optional[int] = None) -> Optional[str]:
        """Why ``value`` is outside the domain (None when it is inside)."""
        if not self.accepts(value):
            return f"must be {self.text}"
        if self.within_epochs and epochs is not None and _number(value) and value > epochs:
            return f"must be at most the schedule's {epochs} epochs"
        return None


POSITIVE = Domain("a finite number > 0", lambda v: _finite(v) and v > 0)
NONNEGATIVE = Domain("a finite number >= 0", lambda v: _finite(v) and v >= 0)
FINITE = Domain("a finite number", _finite)
PROBABILITY = Domain("a probability in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1)
OPEN_UNIT = Domain("a number strictly between 0 and 1", lambda v: _finite(v) and 0 < v < 1)
POSITIVE_INT = Domain("an integer >= 1", lambda v: _integer(v) and v >= 1)
EPOCHS = Domain("a whole number of epochs >= 0", lambda v: _integer(v) and v >= 0, within_epochs=True)
POSITIVE_EPOCHS = Domain("a whole number of epochs >= 1", lambda v: _integer(v) and v >= 1, within_epochs=True)
BOOLEAN = Domain("true or false", lambda v: isinstance(v, bool))


def one_of(*values: Any) -> Domain:
    return Domain("one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


def optional(domain: Domain) -> Domain:
    """``domain`` or null."""
    return Domain(f"{domain.text} or null", lambda v: v is None or domain.accepts(v), domain.within_epochs)


def or_values(domain: Domain, *specials: Any) -> Domain:
    """``domain`` or one of the named special values (e.g. ``"auto"``, ``"same"``)."""
    text = f"{domain.text} or " + " or ".join(repr(s) for s in specials)
    return Domain(text, lambda v: (not isinstance(v, bool) and v in specials) or domain.accepts(v),
                  domain.within_epochs)
