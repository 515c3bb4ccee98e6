"""``recipe.eval_every_epoch: false`` evaluates after the last epoch only, and changes nothing else: the same
weights, losses and last-epoch numbers as evaluating (with precise BN) after every epoch."""
from __future__ import annotations

import copy

import pytest
import torch

from repro.harness.cost import CostModel, dataset_sizes
from repro.harness.plan import make_plan
from repro.harness.spec import load_spec
from repro.harness.store import RunStore, run_id_of
from tests.support import tiny_kd_trainer

EVERY = {"epochs": 3, "precise_bn_batches": 2, "eval_every_epoch": True}


def _train(runs, **recipe):
    trainer = tiny_kd_trainer(runs, "r", recipe={**EVERY, **recipe})
    result = trainer.run()
    store = RunStore(runs)
    return result, store.metrics("r"), torch.load(store.model_path("r"), weights_only=True), trainer.deviations


def test_last_epoch_only_trains_the_same_model(tmp_path):
    every, every_history, every_weights, _ = _train(tmp_path / "every")
    last, last_history, last_weights, deviations = _train(tmp_path / "last", eval_every_epoch=False)
    assert every_weights.keys() == last_weights.keys()
    for name, tensor in every_weights.items():
        assert torch.equal(tensor, last_weights[name]), name  # evaluation never touches training
    assert (last["last_top1"], last["last_top5"]) == (every["last_top1"], every["last_top5"])
    assert last["best_epoch"] == 3 and last["best_top1"] == last["last_top1"]
    losses = lambda rows: [{k: v for k, v in row.items() if k.startswith("loss_")} for row in rows]  # noqa: E731
    assert losses(last_history) == losses(every_history)
    assert [row["test_top1"] for row in last_history[:2]] == [None, None]
    assert all(row["test_top1"] is not None for row in every_history)
    assert "evaluated after the last epoch only (its best epoch is the last)" in deviations


def test_default_keeps_run_ids():
    config = {"kind": "train", "recipe": {"epochs": 2, "eval_every_epoch": True}}
    legacy = {"kind": "train", "recipe": {"epochs": 2}}
    assert run_id_of(config) == run_id_of(legacy)
    assert run_id_of({**config, "recipe": {"epochs": 2, "eval_every_epoch": False}}) != run_id_of(legacy)


def test_the_cost_estimate_counts_only_the_evaluations_made(workdirs, monkeypatch):
    plan = make_plan(load_spec("wttm/cifar100-table1"), "smoke")
    model = CostModel(RunStore(workdirs["runs"]), torch.device("cpu"))
    monkeypatch.setattr(model, "images_per_s", lambda *args: 1000.0)
    run = next(r for r in plan.ordered() if r.config["recipe"]["epochs"] > 1 and r.config.get("teacher")
               and r.config["recipe"]["eval_every_epoch"] is False)  # the smoke tier's, but for the ShuffleNets
    epochs = run.config["recipe"]["epochs"]
    train, test = dataset_sizes(run.config["recipe"])
    every = copy.deepcopy(run)
    every.config["recipe"]["eval_every_epoch"] = True
    assert model.estimate_seconds(plan, run) == pytest.approx((epochs * train + test / 3) / 1000.0)
    assert model.estimate_seconds(plan, every) == pytest.approx((epochs * (train + test / 3)) / 1000.0)
