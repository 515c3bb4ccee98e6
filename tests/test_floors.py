"""The smoke tier's learning floors: every teacher and student cell below its floor is named, once."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from repro.cli.plan import _fail_on_floors
from repro.core.errors import ReproError
from repro.harness.compare import CellResult
from repro.harness.floors import floor_problems
from repro.harness.spec import Cell, Floors, MethodDef, Provenance

FLOORS = Floors(teachers=60, students=25, provenance=Provenance(source="assumption", note="test"))


def result(method: str, role: str, mean: float | None, status: str = "done", reported_only: str | None = None
           ) -> CellResult:
    cell = Cell(teacher="wrn_40_2", student="wrn_16_2", method=method)
    definition = MethodDef(role=role, losses={} if role == "teacher" else {"ce": 1.0}, reported_only=reported_only)
    return CellResult(spec_id="test/floors", table="T", cell=cell, method=definition, tier="smoke", metric="best",
                      run_ids=[], mean=mean, status=status)


def plan(tier: str = "smoke", floors: Floors | None = FLOORS) -> SimpleNamespace:
    return SimpleNamespace(tier=tier, spec=SimpleNamespace(tier_floors={"smoke": floors} if floors else {}))


def test_cells_below_their_floor_are_named_and_the_rest_pass() -> None:
    results = [result("Teacher", "teacher", 59.0), result("KD", "student", 24.99), result("WTTM", "student", 25.0),
               result("Teacher2", "teacher", 60.0), result("TTM", "student", None, status="failed"),
               result("FitNet", "student", None, status="reported only", reported_only="copied")]
    problems = floor_problems([(plan(), results)])
    assert problems == [
        "test/floors {teacher: wrn_40_2, student: wrn_16_2, method: Teacher}: top-1 59.00 is below the smoke teacher floor of 60%",
        "test/floors {teacher: wrn_40_2, student: wrn_16_2, method: KD}: top-1 24.99 is below the smoke student floor of 25%",
        "test/floors {teacher: wrn_40_2, student: wrn_16_2, method: TTM}: no smoke result (failed); the student floor is 25% top-1",
    ]


def test_an_exempt_method_is_not_held_to_the_floor() -> None:
    floors = FLOORS.model_copy(update={"exempt": {"FitNet": "hint weight 100 swamps 20 steps of CE"}})
    problems = floor_problems([(plan(floors=floors), [result("FitNet", "student", 1.0), result("KD", "student", 1.0)])])
    assert len(problems) == 1 and "KD" in problems[0]


def test_an_exempt_student_model_is_not_held_to_the_floor_but_its_teacher_is() -> None:
    floors = FLOORS.model_copy(update={"exempt_students": {"wrn_16_2": "does not learn in the budget"}})
    problems = floor_problems([(plan(floors=floors), [result("KD", "student", 1.0), result("Teacher", "teacher", 1.0)])])
    assert len(problems) == 1 and "Teacher" in problems[0]


def test_a_tier_without_floors_checks_nothing() -> None:
    low = [result("KD", "student", 1.0)]
    assert floor_problems([(plan(tier="proxy"), low)]) == []
    assert floor_problems([(plan(floors=Floors(provenance=FLOORS.provenance)), low)]) == []


def test_the_commands_fail_with_every_cell_named() -> None:
    _fail_on_floors([], "smoke")  # nothing below: no error
    with pytest.raises(ReproError) as err:
        _fail_on_floors(["a {x, KD}: top-1 1.00 is below", "b {y, TTM}: top-1 2.00 is below"], "smoke")
    assert "2 cell(s) below the smoke tier's learning floor" in str(err.value)
    assert "a {x, KD}" in str(err.value) and "b {y, TTM}" in str(err.value)


def test_the_wttm_cifar_smoke_tier_declares_its_floors() -> None:
    from repro.harness.spec import load_spec

    floors = load_spec("wttm/cifar100-table1").tier_floors["smoke"]
    assert (floors.teachers, floors.students) == (60, 25) and floors.provenance.note
