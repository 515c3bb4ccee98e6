"""The cost model times the recipe's batch size (capped on a CPU, halved when it does not fit), not batch 16."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from repro.harness import cost
from repro.harness.cost import CPU_MAX_BATCH, CostModel
from repro.harness.store import RunStore


class _Recorder(nn.Module):
    """A tiny model that records the batch sizes it sees and runs out of memory above ``fits``."""

    def __init__(self, seen: list[int], fits: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 5)
        self.seen, self.fits = seen, fits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return self.linear(x.mean(dim=(2, 3)))


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict:
    state = {"batches": [], "fits": 10**9}
    monkeypatch.setattr(cost, "create_model", lambda arch, **args: _Recorder(state["batches"], state["fits"]))
    monkeypatch.setattr(cost, "MIN_SECONDS", 0.0)  # the minimum step count alone: fast and still a real timing
    return state


def _rate(tmp_path, batch_size: int, image_size: int = 8) -> float:
    model = CostModel(RunStore(tmp_path / "runs"), torch.device("cpu"))
    recipe = {"batch_size": batch_size, "pipeline_args": {"image_size": image_size}}
    return model.images_per_s({"arch": "anything", "args": {}}, None, recipe)


def test_the_recipe_batch_is_timed(tmp_path, seen) -> None:
    assert _rate(tmp_path, 24) > 0
    assert set(seen["batches"]) == {24} and len(seen["batches"]) >= 1 + cost.MIN_STEPS  # warm-up + timed steps


def test_a_cpu_caps_the_batch(tmp_path, seen) -> None:
    _rate(tmp_path, 1024)
    assert set(seen["batches"]) == {CPU_MAX_BATCH}
    seen["batches"].clear()
    _rate(tmp_path / "other", 1024, image_size=224)
    assert set(seen["batches"]) == {cost.CPU_MAX_PIXELS // (224 * 224)}  # large images: fewer per batch


def test_a_batch_that_does_not_fit_is_halved(tmp_path, seen) -> None:
    seen["fits"] = 20
    assert _rate(tmp_path, 64) > 0
    assert seen["batches"][:2] == [64, 32] and set(seen["batches"][2:]) == {16}


def test_rates_are_cached_per_batch(tmp_path, seen) -> None:
    _rate(tmp_path, 24)
    first = len(seen["batches"])
    _rate(tmp_path, 24)
    assert len(seen["batches"]) == first  # cached
    _rate(tmp_path, 12)
    assert set(seen["batches"][first:]) == {12}  # another batch, another measurement
