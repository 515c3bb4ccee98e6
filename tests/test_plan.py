"""Planner features: tier model substitutes, pretraining runs, method recipe overrides, teacher sources."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro.cli import main
from repro.core.errors import ReproError
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from tests.conftest import TINY_SPEC


def spec_from(tmp_path: Path, extra: str, replace: tuple[str, str] = ("", "")) -> str:
    text = Path(TINY_SPEC).read_text()
    if replace[0]:
        text = text.replace(*replace)
    path = tmp_path / "spec.yaml"
    path.write_text(text + extra)
    return str(path)


def test_tier_models_substitute_archs_only_at_that_tier(tmp_path, workdirs):
    spec = load_spec(spec_from(tmp_path, "tier_models: {smoke: {resnet14: resnet20}}\n"))
    smoke = {r.config["model"]["arch"] for r in make_plan(spec, "smoke").ordered()}
    full = {r.config["model"]["arch"] for r in make_plan(spec, "full").ordered()}
    assert "resnet20" in smoke and "resnet14" not in smoke
    assert "resnet14" in full and "resnet20" not in full


def test_pretrain_run_initialises_the_student_and_method_recipe_overrides(tmp_path, workdirs):
    extra = ("models:\n  resnet8: {pretrain: Pre}\n")
    spec = load_spec(spec_from(tmp_path, extra, ("  FitNet: {reported_only: \"not implemented\"}",
                                                 "  FitNet: {reported_only: \"not implemented\"}\n"
                                                 "  Pre: {losses: {ce: 1.0}, recipe: {epochs: 1}}")))
    plan = make_plan(spec, "smoke")
    pre = [r for r in plan.ordered() if "pretraining" in r.label]
    assert len(pre) == 1 and pre[0].config["recipe"]["epochs"] == 1
    students = [r for r in plan.ordered() if r.config["model"]["arch"] == "resnet8" and r.config.get("init")]
    assert students and all(r.config["init"]["run"] == pre[0].run_id for r in students)
    assert all(pre[0].run_id in r.deps for r in students)


def test_bad_method_recipe_override_is_refused(tmp_path, workdirs):
    # refused when the spec loads (every tier's recipe under every method's overrides), before any plan
    with pytest.raises(ReproError) as err:
        load_spec(spec_from(tmp_path, "", ("Student: {losses: {ce: 1.0}}",
                                           "Student: {losses: {ce: 1.0}, recipe: {epochz: 1}}")))
    assert "epochz" in str(err.value) and "method 'Student'" in str(err.value)


def test_checkpoint_teachers_become_gated_eval_runs(workdirs):
    plan = make_plan(load_spec(TINY_SPEC), "full")
    teacher = next(r for r in plan.ordered() if r.config["kind"] == "eval")
    assert teacher.config["expected_top1"] == 70.0 and teacher.config["gate_tolerance"] == 0.5
    assert teacher.config["checkpoint"]["path"].endswith("resnet14_vanilla/ckpt_epoch_240.pth")
    ungated = make_plan(load_spec(TINY_SPEC), "full", teacher_gate=False)
    assert next(r for r in ungated.ordered() if r.config["kind"] == "eval").config["gate_tolerance"] is None
    trained = make_plan(load_spec(TINY_SPEC), "full", teacher_source="train")
    assert all(r.config["kind"] == "train" for r in trained.ordered())


def test_schema_command_writes_json_schema(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert "cells" in schema["properties"] and "recipe" in schema["properties"]


def test_teacher_recipe_reaches_only_the_teachers_runs_and_recipe_by_arch_only_that_arch(tmp_path, workdirs):
    spec = load_spec(spec_from(tmp_path, "", replace=(
        "teachers: {source: train, epochs: 2}",
        "teachers: {source: train, epochs: 2, recipe: {schedule: {name: cosine_per_step}, optimizer: {lr: 0.2}}}\n"
        "    recipe_by_arch: {resnet8: {epochs: 5, schedule: {milestones: [4]}}}")))
    runs = make_plan(spec, "smoke").ordered()
    teacher = [r for r in runs if r.config["model"]["arch"] == "resnet14"]
    students = [r for r in runs if r.config["model"]["arch"] == "resnet8"]
    assert len(teacher) == 1 and students
    recipe = teacher[0].config["recipe"]
    assert (recipe["epochs"], recipe["schedule"]["name"], recipe["optimizer"]["lr"]) == (2, "cosine_per_step", 0.2)
    assert recipe["optimizer"]["momentum"] == 0.9  # merged key by key: the rest of the block is the tier's
    for run in students:
        assert (run.config["recipe"]["epochs"], run.config["recipe"]["schedule"]["milestones"]) == (5, [4])
        assert run.config["recipe"]["schedule"]["name"] != "cosine_per_step"
    plain = make_plan(load_spec(TINY_SPEC), "smoke").ordered()
    assert {r.config["model"]["arch"]: r.run_id for r in plain}["resnet14"] != teacher[0].run_id


def test_a_teacher_recipe_the_trainer_refuses_names_itself(tmp_path, workdirs):
    spec = load_spec(spec_from(tmp_path, "", replace=(
        "teachers: {source: train, epochs: 2}", "teachers: {source: train, recipe: {optimizer: {lr: -1}}}")))
    with pytest.raises(ReproError, match=r"teachers\.recipe for teacher resnet14"):
        make_plan(spec, "smoke")
