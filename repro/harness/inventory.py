"""``repro runs``: the runs of the store (or of a spec's plans) as one table, so a run is found without opening
folders: id, label, tier, status, best/last top-1, epochs done, wall time and where it was computed."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from tabulate import tabulate

from repro.harness.plan import Plan
from repro.harness.store import RunStore

COLUMNS = ["Run", "Label", "Tier", "Status", "Best top-1", "Last top-1", "Epochs", "Wall time", "Host @ commit"]


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


def _wall(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    from repro.harness.cost import format_duration

    return format_duration(seconds)


def run_row(store: RunStore, run_id: str, label: str = "", tier: str = "",
            planned: Optional[dict[str, Any]] = None) -> dict[str, str]:
    from repro.harness.executors import run_state

    state = run_state(store, run_id, label)
    result = store.result(run_id) or {}
    config = store.config(run_id) or planned or {}
    metrics = store.metrics(run_id)
    planned_epochs = (config.get("recipe") or {}).get("epochs") if config.get("kind") == "train" else None
    epochs = f"{len(metrics)}/{planned_epochs}" if planned_epochs else "–"
    wall = result.get("wall_time_s")
    if wall is None and metrics:  # still training or interrupted: the time its finished epochs took
        wall = sum(row.get("wall_time_s", 0.0) for row in metrics)
    origin = f"{result['hostname']} @ {result.get('commit', '?')}" if result.get("hostname") else "–"
    return {"Run": run_id, "Label": state.label or result.get("label", ""),
            "Tier": tier or str(config.get("tier", result.get("tier", "?"))), "Status": state.state,
            "Best top-1": _num(result.get("best_top1")), "Last top-1": _num(result.get("last_top1")),
            "Epochs": epochs, "Wall time": _wall(wall), "Host @ commit": origin}


def runs_rows(store: RunStore, plans: Sequence[Plan] = (), tier: Optional[str] = None,
              status: Optional[str] = None) -> list[dict[str, str]]:
    """One row per run of ``plans`` (in plan order, each run once), or of the whole store when none is given;
    filtered by tier and status."""
    if plans:
        seen: dict[str, dict[str, str]] = {}
        for plan in plans:
            for run in plan.ordered():
                if run.run_id not in seen:
                    seen[run.run_id] = run_row(store, run.run_id, run.label, plan.tier, run.config)
        rows = list(seen.values())
    else:
        rows = [run_row(store, run_id) for run_id in store.run_ids()]
    return [r for r in rows if (tier is None or r["Tier"] == tier) and (status is None or r["Status"] == status)]


def runs_table(rows: list[dict[str, str]]) -> str:
    return tabulate([[r[c] for c in COLUMNS] for r in rows], headers=COLUMNS, tablefmt="github",
                    disable_numparse=True)
