"""``recipe.eval_every_epoch: false`` evaluates after the last epoch only, and changes nothing else: the same
weights, losses and last-epoch numbers as evaluating (with precise BN) after every epoch."""
from __future__ import annotations

import json

import torch

from repro.harness.store import RunStore, run_id_of
from tests.support import tiny_kd_trainer

EVERY = {"epochs": 3, "precise_bn_batches": 2, "eval_every_epoch": True}


def _train(runs, **recipe):
    trainer = tiny_kd_trainer(runs, "r", recipe={**EVERY, **recipe})
    result = trainer.run()
    store = RunStore(runs)
    history = [json.loads(line) for line in (store.run_dir("r") / "metrics.jsonl").read_text().splitlines()]
    return result, history, torch.load(store.model_path("r"), weights_only=True), trainer.deviations


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
