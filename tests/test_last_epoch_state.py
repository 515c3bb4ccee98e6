"""The full state is checkpointed after every epoch but the last (model.pt follows it at once); a run killed after
its last epoch resumes from the epoch before and replays the last one bit for bit."""
from __future__ import annotations

import pytest
import torch

from repro.harness.store import RunStore
from repro.train.loop import Trainer
from tests.support import tiny_kd_trainer


def _trainer(workdirs: dict, run_id: str, cache: bool = False) -> Trainer:
    return tiny_kd_trainer(workdirs["runs"], run_id, teacher_cache=cache)


def _weights(store: RunStore, run_id: str) -> dict[str, torch.Tensor]:
    return torch.load(store.model_path(run_id), weights_only=True)


def test_the_last_epoch_writes_metrics_and_weights_but_no_checkpoint(workdirs) -> None:
    trainer = _trainer(workdirs, "run")
    result = trainer.run()
    store = RunStore(workdirs["runs"])
    epochs = trainer.recipe.epochs
    assert epochs >= 2 and result["epochs"] == epochs
    assert [row["epoch"] for row in store.metrics("run")] == list(range(1, epochs + 1))
    state = torch.load(store.checkpoint_path("run"), weights_only=False)
    assert state["epoch"] == epochs - 1 and len(state["history"]) == epochs - 1
    assert store.model_path("run").is_file()


@pytest.mark.parametrize("cache", [False, True], ids=["live-teacher", "teacher-cache"])
def test_a_run_killed_after_its_last_epoch_replays_it_exactly(workdirs, cache) -> None:
    store = RunStore(workdirs["runs"])
    expected = _trainer(workdirs, "clean", cache).run()
    finished = _trainer(workdirs, "killed", cache).run()
    assert finished["best_top1"] == expected["best_top1"]
    # Killed between the last epoch's metrics and model.pt: the weights are gone, the last metrics line is not.
    store.model_path("killed").unlink()
    resumed = _trainer(workdirs, "killed", cache)
    trained, train_epoch = [], resumed._train_epoch
    resumed._train_epoch = lambda epoch, bar: trained.append(epoch) or train_epoch(epoch, bar)
    got = resumed.run()
    assert trained == [resumed.recipe.epochs]  # only the last epoch ran again
    assert (got["best_top1"], got["last_top1"], got["best_epoch"]) == \
           (expected["best_top1"], expected["last_top1"], expected["best_epoch"])
    a, b = _weights(store, "clean"), _weights(store, "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(store.metrics("killed")) == len(store.metrics("clean")) == resumed.recipe.epochs
    assert store.metrics("killed") == [
        {**row, "wall_time_s": got_row["wall_time_s"], "images_per_s": got_row["images_per_s"]}
        for row, got_row in zip(store.metrics("clean"), store.metrics("killed"))]
