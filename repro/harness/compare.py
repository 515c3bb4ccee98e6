"""Aggregate each cell's seeds and compare with the reported value: delta and a verdict.

The verdict rule (also printed under every table):
- smoke and proxy tiers are never compared with the paper ("not compared");
- a cell is "reproduced" when |reproduced mean - reported mean| <= max(2 * SE, 0.1) points, where
  SE = sqrt(s_r^2 / n_r + s_o^2 / n_o) combines the reported std s_r over its n_r runs and our std s_o over our
  n_o seeds; a missing std borrows the other side's, and 0.3 points (a typical CIFAR seed std) when both miss;
- otherwise "below" or "above"; a cell without a reported number is "not comparable".
The metric follows the reported protocol (best-epoch or last-epoch) when the ledger states it, else the spec's,
and measures what the reported number measures (``Reported.metric``: top-1 or top-5; at the best epoch, the top-5
of the epoch with the best top-1, the checkpoint the best-epoch protocol keeps).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

from repro.harness.plan import Plan
from repro.harness.spec import Cell, MethodDef, Reported
from repro.harness.store import RunStore

ASSUMED_SEED_STD = 0.3
MIN_TOLERANCE = 0.1
VERDICT_RULE = (
    "Verdict: smoke/proxy tiers are never compared with the paper. At the full tier a cell is *reproduced* when "
    "|Δ| ≤ max(2·SE, 0.1) points with SE = √(s_r²/n_r + s_o²/n_o) (reported std over its runs, our std over our "
    f"seeds; a missing std borrows the other's, {ASSUMED_SEED_STD} when both are missing), else *below*/*above*. "
    "The metric follows the reported protocol (best or last epoch) where the ledger states it, and the "
    "reported measure (top-1 or top-5)."
)


@dataclass
class CellResult:
    spec_id: str
    table: str
    cell: Cell
    method: MethodDef
    tier: str
    metric: str  # "best" or "last": the protocol compared
    run_ids: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    mean: Optional[float] = None
    std: Optional[float] = None
    n: int = 0
    best_mean: Optional[float] = None
    last_mean: Optional[float] = None
    status: str = "pending"  # pending | partial | done | failed | reported only
    verdict: str = "pending"
    delta: Optional[float] = None
    tolerance: Optional[float] = None
    overrides: list[str] = field(default_factory=list)  # --set overrides its runs were planned (or recorded) with

    @property
    def reported(self) -> Reported:
        return self.cell.reported


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def tolerance(reported: Reported, std: Optional[float], n: int) -> float:
    s_r = reported.std if reported.std is not None else std
    s_o = std if std is not None else reported.std
    if s_r is None and s_o is None:
        s_r = s_o = ASSUMED_SEED_STD
    n_r = reported.n or 1
    se = math.sqrt((s_r or 0.0) ** 2 / n_r + (s_o or 0.0) ** 2 / max(n, 1))
    return max(2 * se, MIN_TOLERANCE)


def verdict_for(result: CellResult) -> str:
    rep = result.reported
    if result.status in ("reported only", "failed", "pending"):
        return {"reported only": "reported only", "failed": "failed", "pending": "pending"}[result.status]
    if result.tier != "full":
        return f"not compared ({result.tier} tier)"
    if rep.status != "reported" or rep.mean is None or result.mean is None:
        return "not comparable"
    result.delta = result.mean - rep.mean
    result.tolerance = tolerance(rep, result.std, result.n)
    if abs(result.delta) <= result.tolerance:
        return "reproduced"
    return "below" if result.delta < 0 else "above"


def compare_cell(spec_id: str, table: str, cell: Cell, method: MethodDef, run_ids: list[str], tier: str,
                 spec_metric: str, store: RunStore) -> CellResult:
    metric = cell.reported.protocol if cell.reported.protocol in ("best", "last") else spec_metric
    out = CellResult(spec_id, table, cell, method, tier, metric, run_ids)
    if method.reported_only is not None:
        out.status = out.verdict = "reported only"
        return out
    results = [store.result(rid) for rid in run_ids]
    finished = [r for r in results if r is not None]
    out.results = finished
    if any(r.get("status") == "failed" for r in finished):
        out.status = "failed"
    elif not finished:
        out.status = "pending"
    else:
        out.status = "done" if len(finished) == len(run_ids) else "partial"
        best = [r["best_top1"] for r in finished]
        last = [r["last_top1"] for r in finished]
        out.best_mean, _ = _mean_std(best)
        out.last_mean, _ = _mean_std(last)
        measured = [r[f"{metric}_{cell.reported.metric}"] for r in finished]  # e.g. best_top1, last_top5
        out.mean, out.std = _mean_std(measured)
        out.n = len(finished)
    out.verdict = verdict_for(out)
    out.overrides = _unique([o for r in finished for o in r.get("overrides", [])])
    return out


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def compare_plan(plan: Plan, store: RunStore) -> list[CellResult]:
    recipe = plan.spec.recipe_for(plan.tier)
    out = []
    for c in plan.cells:
        result = compare_cell(plan.spec.id, plan.spec.table, c.cell, c.method, c.run_ids, plan.tier, recipe.metric,
                              store)
        planned = [o for rid in c.run_ids for o in plan.runs[rid].overrides]  # pending runs are marked too
        result.overrides = _unique(result.overrides + planned)
        out.append(result)
    return out
