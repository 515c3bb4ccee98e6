"""Verdicts: hand-computed tolerances, tiers never compared, failures never shown as numbers."""
from __future__ import annotations

import math

import pytest

from repro.harness.compare import compare_cell, tolerance
from repro.harness.spec import Cell, MethodDef, Reported


class FakeStore:
    def __init__(self, results: dict[str, dict]):
        self.results = results

    def result(self, run_id: str):
        return self.results.get(run_id)


def cell(mean=76.37, std=0.10, n=5, protocol="best") -> Cell:
    return Cell(teacher="t", student="s", method="WTTM",
                reported=Reported(mean=mean, std=std, n=n, protocol=protocol))


def done(best: float, last: float) -> dict:
    return {"status": "done", "best_top1": best, "last_top1": last}


def compare(c: Cell, runs: dict[str, dict], tier: str = "full", ids=None):
    method = MethodDef(losses={"ce": 1.0, "wttm": {"weight": 4}})
    return compare_cell("s", "Table 1", c, method, ids or list(runs), tier, "best", FakeStore(runs))


def test_tolerance_hand_computed():
    # SE = sqrt(0.10^2/5 + 0.20^2/3); tolerance = 2 SE
    expected = 2 * math.sqrt(0.01 / 5 + 0.04 / 3)
    assert tolerance(Reported(mean=1, std=0.10, n=5), 0.20, 3) == pytest.approx(expected)
    # both stds missing: 0.3 assumed on both sides
    assert tolerance(Reported(mean=1), None, 1) == pytest.approx(2 * math.sqrt(0.09 + 0.09))
    # tiny stds: the 0.1 floor
    assert tolerance(Reported(mean=1, std=0.001, n=5), 0.001, 5) == 0.1


def test_reproduced_below_above():
    runs = {"a": done(76.3, 76.0), "b": done(76.5, 76.2), "c": done(76.4, 76.1)}
    r = compare(cell(), runs)
    assert r.mean == pytest.approx(76.4) and r.n == 3 and r.verdict == "reproduced"
    assert r.delta == pytest.approx(0.03)
    low = compare(cell(mean=78.0), runs)
    assert low.verdict == "below" and low.delta == pytest.approx(-1.6)
    assert compare(cell(mean=75.0), runs).verdict == "above"


def test_metric_follows_reported_protocol():
    runs = {"a": done(76.4, 75.0), "b": done(76.4, 75.2)}
    last = compare(cell(mean=75.1, protocol="last"), runs)
    assert last.metric == "last" and last.mean == pytest.approx(75.1) and last.verdict == "reproduced"
    assert last.best_mean == pytest.approx(76.4)


def test_smoke_and_proxy_are_never_compared():
    runs = {"a": done(76.37, 76.37)}
    assert compare(cell(), runs, tier="smoke").verdict == "not compared (smoke tier)"
    assert compare(cell(), runs, tier="proxy").verdict == "not compared (proxy tier)"


def test_failed_run_shows_failed_not_a_number():
    runs = {"a": done(76.4, 76.0), "b": {"status": "failed", "reason": "non-finite loss"}}
    r = compare(cell(), runs)
    assert r.verdict == "failed" and r.mean is None


def test_pending_partial_and_not_comparable():
    assert compare(cell(), {}, ids=["x", "y"]).verdict == "pending"
    partial = compare(cell(), {"a": done(76.4, 76.0)}, ids=["a", "b"])
    assert partial.status == "partial" and partial.n == 1
    na = compare(cell(mean=None, std=None), {"a": done(70.0, 70.0)})
    assert na.verdict == "not comparable"
    missing = Cell(teacher="t", student="s", method="WTTM", reported=Reported(status="not_transcribed"))
    assert compare(missing, {"a": done(70.0, 70.0)}).verdict == "not comparable"
