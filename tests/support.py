"""Small pieces several test modules share (one copy each, so the tests stay in step)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# The tiny SSTA smoke tier both SSTA end-to-end tests use: 4 classes x 4 images at 32 px, one epoch.
TINY_SSTA_SMOKE_TIER: dict[str, Any] = {
    "data": {"root": "smoke/test-ssta-c4-n4-s32",
             "synthetic": {"classes": 4, "per_class": 4, "val_per_class": 2, "size": 32, "seed": 0}},
    "epochs": 1, "batch_size": 8, "teachers": {"epochs": 1}}


def tiny_ssta_spec(spec_id: str, title: str, output: str, methods: dict, cells: list[dict]) -> dict[str, Any]:
    """A throw-away SSTA spec on the tiny smoke tier (the paper's ImageNet base, one epoch)."""
    return {"base": "ssta/_imagenet", "id": spec_id, "paper": "ssta", "title": title, "table": "test",
            "output": output, "tiers": {"smoke": TINY_SSTA_SMOKE_TIER}, "methods": methods, "cells": cells}


class ConstantLogits(nn.Module):
    """Always predicts ``winner`` out of ``num_classes``."""

    def __init__(self, num_classes: int, winner: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(winner), num_classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def silence_heads(model: nn.Module, keep: dict[int, int]) -> None:
    """Zero the output-projection columns of every head except ``keep[layer]`` (layers not in keep: all)."""
    with torch.no_grad():
        for layer, block in enumerate(model.vit.blocks):
            attn = block.attn
            for head in range(attn.num_heads):
                if keep.get(layer, -1) != head:
                    attn.proj.weight[:, head * attn.head_dim:(head + 1) * attn.head_dim] = 0


def non_finite_term(at_step: int, value: float) -> type:
    """A loss term (no teacher) that is 0 with a gradient path every step except ``at_step`` (1-based), where it is
    ``value`` (nan or inf): how the tests make a run fail mid-epoch."""
    from repro.methods.base import LossTerm

    class NonFiniteAt(LossTerm):
        needs_teacher = False

        def __init__(self, ctx, **params):
            super().__init__(ctx, **params)
            self.calls = 0

        def forward(self, out, batch):
            self.calls += 1
            return out.logits.float().mean() * 0 + (value if self.calls == at_step else 0.0)

    return NonFiniteAt


def tiny_kd_trainer(runs: Any, run_id: str, losses: dict | None = None, teacher_cache: bool = False,
                    recipe: dict | None = None) -> Any:
    """A Trainer for the KD student of tests/specs/tiny.yaml (its losses replaced by ``losses`` when given, its
    recipe updated with ``recipe``), with a randomly initialised teacher (seed 5) in place of the trained one,
    storing into ``runs``."""
    import copy

    from repro.harness.plan import make_plan
    from repro.harness.spec import load_spec
    from repro.harness.store import RunStore
    from repro.models import create_model
    from repro.train.loop import Resolved, Trainer
    from tests.conftest import TINY_SPEC

    plan = make_plan(load_spec(TINY_SPEC), "smoke")
    run = next(r for r in plan.ordered() if r.config["kind"] == "train" and r.config["teacher"]
               and "kd" in r.config["losses"])
    config = copy.deepcopy(run.config)
    if losses is not None:
        config["losses"] = losses
    config["recipe"]["teacher_cache"] = teacher_cache
    config["recipe"].update(recipe or {})
    teacher_cfg = plan.runs[config["teacher"]["run"]].config["model"]
    torch.manual_seed(5)
    teacher = create_model(teacher_cfg["arch"], num_classes=teacher_cfg["num_classes"]).eval()
    return Trainer(config, RunStore(runs), run_id, torch.device("cpu"),
                   Resolved(teacher=teacher, teacher_key="t"), progress=False)


def epoch_losses(distiller: Any, dataset: Any, epochs: list[int], mean: Any, std: Any) -> list[dict[str, float]]:
    """Each step's weighted term losses of ``distiller`` over ``epochs`` of a batch-4 augmented loader (seed 3).
    The global RNG is reseeded first: CRD draws its negatives from it, so two calls make the same draws."""
    from repro.data.loader import TensorLoader

    torch.manual_seed(2)
    loader = TensorLoader(dataset, 4, mean, std, train=True, augment=True, seed=3, device="cpu")
    losses = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            _, terms = distiller.forward_train(batch)
            losses.append({name: value.item() for name, value in terms.items()})
    return losses
