"""Learning floors: the lowest top-1 a tier's teachers and students may show (``Spec.tier_floors``).

The smoke tier's numbers say nothing about the paper, but they must say that something learned: a sign error in
a loss, a detached gradient or a wrong teacher leaves a student near chance. ``floor_problems`` names every cell
of a compared plan that sits below its floor (or has no number), for ``repro smoke`` and ``repro table`` to fail
on after the tables are written.
"""
from __future__ import annotations

from typing import Iterable, Optional

from repro.harness.compare import CellResult
from repro.harness.plan import Plan
from repro.harness.spec import describe_cell


def cell_name(result: CellResult) -> str:
    return f"{result.spec_id} {{{describe_cell(result.cell)}}}"


def _floor_of(plan: Plan, result: CellResult) -> Optional[float]:
    floors = plan.spec.tier_floors.get(plan.tier)  # type: ignore[call-overload]
    if floors is None or result.method.reported_only is not None or result.cell.method in floors.exempt:
        return None
    if result.method.role == "teacher":
        return floors.teachers
    return None if result.cell.student in floors.exempt_students else floors.students


def floor_problems(sections: Iterable[tuple[Plan, list[CellResult]]]) -> list[str]:
    """One line per cell below its tier's floor or without a result, in table order."""
    problems = []
    for plan, results in sections:
        for result in results:
            floor = _floor_of(plan, result)
            if floor is None:
                continue
            role = "teacher" if result.method.role == "teacher" else "student"
            if result.mean is None:
                problems.append(f"{cell_name(result)}: no {plan.tier} result ({result.status}); the {role} floor "
                                f"is {floor:g}% top-1")
            elif result.mean < floor:
                problems.append(f"{cell_name(result)}: top-1 {result.mean:.2f} is below the {plan.tier} {role} "
                                f"floor of {floor:g}%")
    return problems
