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
