"""Stamps say what ran: torch.compile of the training step, the teacher-output cache (used or not, in which dtype,
pre-filled by `repro teachers cache` into the very file training opens), SSTA's head choice in result.json, the
reported metric compared, and the few spec fields the folder pipelines used to ignore."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from repro.harness.compare import compare_cell
from repro.methods import get_term
from repro.harness.plan import make_plan
from repro.harness.execute import execute
from repro.harness.spec import Cell, MethodDef, load_spec
from repro.harness.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")


def cifar_spec(tmp_path: Path, smoke: dict, methods: dict, cells: list[dict]) -> str:
    spec = {"base": "wttm/_cifar100", "id": "test/stamps", "paper": "test", "title": "stamps", "table": "test",
            "output": "test-stamps", "tier_seeds": {"smoke": 1},
            "tiers": {"smoke": {"data": {"synthetic": {"classes_used": 4, "train_per_class": 8, "test_per_class": 4,
                                                       "seed": 0}},
                                "epochs": 1, "batch_size": 8, "teachers": {"source": "train", "epochs": 1},
                                **smoke}},
            "methods": methods, "cells": cells}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def result_of(store: RunStore, run_id: str) -> dict:
    return json.loads((store.run_dir(run_id) / "result.json").read_text())


@pytest.mark.slow
def test_compile_compiles_the_training_step_and_says_so(tmp_path, workdirs):
    import torch._dynamo

    spec = cifar_spec(tmp_path, {"compile": True}, {"Student": {"losses": {"ce": 1.0}}},
                      [{"student": "resnet8", "method": "Student"}])
    plan = make_plan(load_spec(spec), "smoke")
    (run_id,) = plan.cells[0].run_ids
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    store = RunStore(workdirs["runs"])
    summary = execute(plan, store, torch.device("cpu"), progress=False)
    assert summary.done == [run_id]
    result = result_of(store, run_id)
    stamp = [d for d in result["deviations"] if "torch.compile" in d]
    assert stamp == ["torch.compile (inductor) of the student's forward, training and evaluation; teacher, loss "
                     "terms, backward bookkeeping and optimizer step eager"]
    # Two graphs at least: the training-mode forward (batch statistics, backward) and the eval-mode one.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    # The compiled module saved plain names: the weights load into an uncompiled model.
    from repro.models import create_model

    state = torch.load(store.model_path(run_id), weights_only=True)
    heads = json.loads((store.run_dir(run_id) / "config.json").read_text())["model"]["num_classes"]
    create_model("resnet8", num_classes=heads).load_state_dict(state)


KD_AND_CRD = {"KD": {"losses": {"ce": 0.1, "kd": {"weight": 0.9, "temperature": 4}}},
              "CRD": {"losses": {"ce": 1.0, "kd": {"weight": 1.0, "temperature": 4}, "crd": {"weight": 0.8, "k": 8}}}}


def prefilled_cache_stamps(tmp_path, workdirs, smoke: dict, methods: dict) -> tuple[dict, list[list[str]]]:
    """Train the teacher, pre-fill its cache (`repro teachers cache`), run one resnet8 cell per method and check
    that training opened that very file (no other was created) and found every view filled (nothing written).
    Returns the cache's sidecar keys and each cell's deviations, in the methods' order."""
    from repro.harness.execute import cache_teachers
    from repro.train.teacher_cache_open import cache_dir

    cells = [{"teacher": "resnet8", "student": "resnet8", "method": name} for name in methods]
    spec = cifar_spec(tmp_path, {"teacher_cache": True, "teacher_cache_dtype": "float32", **smoke}, methods, cells)
    plan = make_plan(load_spec(spec), "smoke")
    store = RunStore(workdirs["runs"])
    teacher_id = plan.runs[plan.cells[0].run_ids[0]].config["teacher"]["run"]
    teacher_only = make_plan(load_spec(spec), "smoke")
    teacher_only.runs = {teacher_id: plan.runs[teacher_id]}
    execute(teacher_only, store, torch.device("cpu"), progress=False)

    ((filled_id, computed),) = cache_teachers(plan, store, torch.device("cpu"))
    assert filled_id == teacher_id and computed == 32 * 162
    files = sorted(cache_dir(store.root).glob("*.logits"))
    keys = json.loads(files[0].with_suffix(".json").read_text())
    assert len(files) == 1 and keys["dtype"] == "float32"
    before = hashlib.sha256(files[0].read_bytes()).hexdigest()

    assert not execute(plan, store, torch.device("cpu"), progress=False).failed
    assert sorted(cache_dir(store.root).glob("*.logits")) == files
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == before
    return keys, [result_of(store, cell.run_ids[0])["deviations"] for cell in plan.cells]


def test_teacher_cache_stamps_what_ran_and_a_float32_prefill_is_the_file_training_opens(tmp_path, workdirs):
    keys, (kd, crd) = prefilled_cache_stamps(tmp_path, workdirs, {"teacher_cache_features": False}, KD_AND_CRD)
    assert "feature_width" not in keys
    assert "teacher logits from the exact teacher-output cache (float32)" in kd
    assert not any("from the exact teacher-output cache" in d for d in crd)
    assert "teacher_cache requested but not used (crd read the teacher's features, so the teacher ran live)" in crd


def test_feature_cache_serves_the_last_feature_terms_from_the_prefilled_file_and_says_so(tmp_path, workdirs):
    methods = {**KD_AND_CRD, "ITRD": {"losses": {"ce": 1.0, "itrd": 1.0}},
               "FitNet": {"losses": {"ce": 1.0, "fitnet": {"weight": 100, "hint_layer": 2}}},
               "CRD+AT": {"losses": {"ce": 1.0, "crd": {"weight": 0.8, "k": 8}, "at": {"weight": 1000, "p": 2}}}}
    keys, (kd, crd, itrd, fitnet, crd_at) = prefilled_cache_stamps(tmp_path, workdirs, {"teacher_cache_features": True},
                                                           methods)
    assert keys["feature_width"] == 64  # resnet8's pooled feature
    assert "teacher logits from the exact teacher-output cache (float32)" in kd
    for stamps in (crd, itrd):
        assert "teacher logits and last feature from the exact teacher-output cache (float32)" in stamps
    assert ("teacher_cache requested but not used (fitnet read teacher features other than the last one, so the "
            "teacher ran live)") in fitnet
    # a mixed run names the term that keeps the teacher live, not every feature term
    assert ("teacher_cache requested but not used (at read teacher features other than the last one, so the "
            "teacher ran live)") in crd_at


def test_ssta_result_json_holds_the_head_selection(tmp_path, monkeypatch):
    from tests.test_ssta_smoke import TINY_SPEC as SSTA_SPEC

    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "data"))
    spec_file = tmp_path / "ssta.yaml"
    spec_file.write_text(yaml.safe_dump(SSTA_SPEC))
    plan = make_plan(load_spec(str(spec_file)), "smoke")
    store = RunStore(tmp_path / "runs")
    assert not execute(plan, store, torch.device("cpu"), progress=False).failed
    report = result_of(store, plan.cells[0].run_ids[0])["term_reports"]["ssta_attn"]
    for role, loss in (("teacher", "ce"), ("ta", "feature")):
        heads = report["heads"][role]
        assert heads["rule"] == "importance" and heads["loss"] == loss and heads["importance_batch"] == 1
        assert len(heads["heads"]) == 1 and 0 <= heads["heads"][0] < len(heads["scores"])
        assert heads["pairs"] == [[heads["layer"], heads["heads"][0]]]
        assert max(heads["scores"]) == heads["scores"][heads["heads"][0]]
    assert report["stop_epochs"] == {"teacher": 1, "ta": 1}


def test_reported_metric_top5_compares_top5(workdirs):
    store = RunStore(workdirs["runs"])
    results = {"r1": {"best_top1": 60.0, "best_top5": 85.0, "last_top1": 59.0, "last_top5": 84.0},
               "r2": {"best_top1": 62.0, "best_top5": 87.0, "last_top1": 61.0, "last_top5": 86.0}}
    for run_id, fields in results.items():
        store.write_result(run_id, {"status": "done", **fields})
    method = MethodDef(losses={"ce": 1.0})
    for metric, protocol, expected in (("top5", "best", 86.0), ("top5", "last", 85.0), ("top1", "best", 61.0)):
        cell = Cell(student="resnet8", method="Student",
                    reported={"mean": 86.0, "std": 0.5, "n": 3, "protocol": protocol, "metric": metric})
        out = compare_cell("test", "t", cell, method, ["r1", "r2"], "full", "best", store)
        assert out.mean == pytest.approx(expected), (metric, protocol)


def test_methods_ask_each_term_whether_they_need_a_teacher():
    assert not MethodDef(losses={"ce": 1.0}).needs_teacher()
    assert not MethodDef(losses={"masked_recon": 1.0}).needs_teacher()  # label-free: no teacher at all
    assert MethodDef(losses={"ce": 1.0, "kd": 1.0}).needs_teacher()
    # SSTA's attention term runs the teacher itself: no Distiller outputs, but the run needs the teacher model
    assert not get_term("ssta_attn").needs_teacher and MethodDef(losses={"ssta_attn": 1.0}).needs_teacher()
    assert not MethodDef(role="teacher", losses={"kd": 1.0}).needs_teacher()


def test_folder_pipelines_honour_eval_batch_size(tmp_path):
    from repro.data.imagefolder import write_synthetic_imagefolder
    from repro.data.pipelines_folder import build_folder_pipeline

    write_synthetic_imagefolder(tmp_path, classes=2, per_class=4, val_per_class=5, size=16, seed=0)
    train, test, *_ = build_folder_pipeline("imagenet_standard", tmp_path, 16, 4, 0, "cpu", eval_batch_size=3)
    assert [int(b.labels.numel()) for b in test] == [3, 3, 3, 1]
    assert all(int(b.labels.numel()) == 4 for b in train)
