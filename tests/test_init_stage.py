"""The initialisation stage (RepDistiller ``helper/pretrain.py``) as part of a run: what it trains, what it logs
and stamps, and that a run interrupted during or after it resumes to exactly the uninterrupted result."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from repro.core.errors import ReproError
from repro.models import create_model
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from repro.harness.store import RunStore
from repro.train.loop import Resolved, Trainer, train_run
from tests.conftest import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def _config(losses: dict[str, Any], epochs: int = 2) -> dict[str, Any]:
    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    run = next(r for r in plan.ordered() if r.config["kind"] == "train" and "kd" in r.config["losses"])
    config = copy.deepcopy(run.config)
    config["losses"] = {"ce": {"weight": 1.0}, **losses}
    config["recipe"]["epochs"] = epochs
    return config


def _teacher(config: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(123)
    return create_model("resnet14", num_classes=config["model"]["num_classes"])


def _train(config: dict[str, Any], store: RunStore, run_id: str, teacher: torch.nn.Module,
           monkeypatch: pytest.MonkeyPatch, stop_after: int = 0,
           snapshots: list | None = None) -> dict[str, Any] | None:
    """Train; with ``stop_after`` n, interrupt right after the n-th checkpoint. ``snapshots`` collects
    (student, terms) state copies at every checkpoint."""
    original = Trainer._save_checkpoint
    calls = {"n": 0}

    def save(self: Trainer, epoch: int, best: dict, history: list) -> None:
        original(self, epoch, best, history)
        calls["n"] += 1
        if snapshots is not None:
            snapshots.append((copy.deepcopy(self.student.state_dict()),
                              copy.deepcopy(self.distiller.terms.state_dict())))
        if calls["n"] == stop_after:
            raise Interrupted

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    try:
        return train_run(config, store, run_id, torch.device("cpu"), Resolved(teacher=teacher), progress=False)
    except Interrupted:
        return None
    finally:
        monkeypatch.setattr(Trainer, "_save_checkpoint", original)


def test_ft_init_stage_trains_the_paraphraser_alone_and_is_recorded(workdirs, monkeypatch):
    config = _config({"ft": {"weight": 200.0, "init_epochs": 2, "init_lr": 0.01}})
    store = RunStore(workdirs["runs"])
    snapshots: list = []
    result = _train(config, store, "ft", _teacher(config), monkeypatch, snapshots=snapshots)
    rows = store.metrics("ft")
    assert [r.get("stage") for r in rows] == ["init", "init", None, None]
    assert [r.get("init_epoch") for r in rows[:2]] == [1, 2] and [r["epoch"] for r in rows[2:]] == [1, 2]
    assert all(r["lr"] == 0.01 and r["loss_init_ft"] > 0 for r in rows[:2])
    assert "loss_ft" in rows[2] and "loss_ft" not in rows[0]
    stage = result["init_stage"]
    assert stage["term"] == "ft" and stage["epochs"] == 2 and stage["lr"] == 0.01
    assert stage["trained"] == ["ft.paraphraser"]
    assert stage["loss_per_epoch"] == [rows[0]["loss_init_ft"], rows[1]["loss_init_ft"]]
    (s0, t0), (s2, t2), (s_end, t_end) = snapshots[0], snapshots[1], snapshots[-1]
    para = [k for k in t0 if k.startswith("ft.paraphraser.")]
    trans = [k for k in t0 if k.startswith("ft.translator.")]
    # In the stage: the student is untouched (not trained, eval mode: its BN statistics too), the translator too.
    torch.manual_seed(config["seed"])
    fresh = create_model(config["model"]["arch"], num_classes=config["model"]["num_classes"])
    assert all(torch.equal(s2[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(t0[k], t2[k]) for k in trans)
    assert not all(torch.equal(t0[k], t2[k]) for k in para)
    # After it: the paraphraser is frozen, the translator and the student train.
    assert all(torch.equal(t2[k], t_end[k]) for k in para)
    assert not all(torch.equal(t2[k], t_end[k]) for k in trans)
    assert not all(torch.equal(s2[k], s_end[k]) for k in s2)


def test_ab_init_stage_trains_student_features_and_connectors_not_the_classifier(workdirs, monkeypatch):
    config = _config({"ab": {"init_epochs": 1}}, epochs=1)
    config["model"] = {**config["model"], "arch": "wrn_16_2"}  # other widths than the teacher: real connectors
    store = RunStore(workdirs["runs"])
    snapshots: list = []
    result = _train(config, store, "ab", _teacher(config), monkeypatch, snapshots=snapshots)
    torch.manual_seed(config["seed"])
    fresh = create_model("wrn_16_2", num_classes=config["model"]["num_classes"]).state_dict()
    student, terms = snapshots[0]  # after the one init epoch
    assert torch.equal(student["fc.weight"], fresh["fc.weight"]) and torch.equal(student["fc.bias"], fresh["fc.bias"])
    assert not torch.equal(student["conv1.weight"], fresh["conv1.weight"])
    assert result["init_stage"]["trained"] == ["ab.connectors", "student (all but its classifier)"]
    assert result["init_stage"]["lr"] == config["recipe"]["optimizer"]["lr"]  # the run's base lr
    assert any(k.startswith("ab.connectors.") for k in terms)
    assert "loss_ab" not in store.metrics("ab")[-1]  # no loss after the stage


@pytest.mark.parametrize("stop_after", [1, 3])  # during the stage (after init epoch 1 of 2); after it (epoch 1)
def test_a_run_interrupted_during_or_after_the_init_stage_resumes_exactly(workdirs, monkeypatch, stop_after):
    config = _config({"ft": {"weight": 200.0, "init_epochs": 2}})
    teacher = _teacher(config)
    store = RunStore(workdirs["runs"])
    clean = _train(config, store, "clean", teacher, monkeypatch)
    assert _train(config, store, "killed", teacher, monkeypatch, stop_after=stop_after) is None
    assert store.checkpoint_path("killed").is_file() and store.result("killed") is None
    assert len(store.metrics("killed")) == stop_after
    resumed = _train(config, store, "killed", teacher, monkeypatch)
    assert resumed["best_top1"] == clean["best_top1"] and resumed["last_top1"] == clean["last_top1"]
    assert resumed["init_stage"]["loss_per_epoch"] == clean["init_stage"]["loss_per_epoch"]
    timing = ("wall_time_s", "images_per_s")  # differ between two runs of the same computation
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(store.metrics("killed")) == strip(store.metrics("clean"))
    a = torch.load(store.model_path("clean"), weights_only=True)
    b = torch.load(store.model_path("killed"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_terms_with_init_stages_are_refused(workdirs):
    config = _config({"ft": {"init_epochs": 1}, "fsp": {"init_epochs": 1}})
    with pytest.raises(ReproError, match="at most one loss term"):
        train_run(config, RunStore(workdirs["runs"]), "two", torch.device("cpu"),
                  Resolved(teacher=_teacher(config)), progress=False)


def test_the_cost_estimate_counts_the_init_stage(workdirs, monkeypatch):
    from repro.harness.cost import CostModel, dataset_sizes
    from repro.methods import get_term

    assert get_term("ab").planned_init_epochs({}) == 30  # RepDistiller --init_epochs
    assert get_term("ft").planned_init_epochs({"init_epochs": 4}) == 4
    assert get_term("kd").planned_init_epochs({"temperature": 4}) == 0
    plan = make_plan(load_spec("wttm/cifar100-repdistiller"), "full")
    model = CostModel(RunStore(workdirs["runs"]), torch.device("cpu"))
    monkeypatch.setattr(model, "images_per_s", lambda *args: 1000.0)
    runs = {r.cell.method: r for r in plan.cells if r.cell.student == "resnet8x4" and r.cell.method != "Teacher"}
    student = model.estimate_seconds(plan, plan.runs[runs["Student"].run_ids[0]])
    train, _ = dataset_sizes(plan.runs[runs["Student"].run_ids[0]].config["recipe"])
    for method in ("AB", "FT", "FSP"):
        run = plan.runs[runs[method].run_ids[0]]
        assert model.estimate_seconds(plan, run) == pytest.approx(student + 30 * train / 1000.0)
    assert model.estimate_seconds(plan, plan.runs[runs["SP"].run_ids[0]]) == pytest.approx(student)
