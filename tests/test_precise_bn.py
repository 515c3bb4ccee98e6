"""Precise BN (smoke tier): BatchNorm statistics re-estimated as the plain average over training batches."""
from __future__ import annotations

import torch
import torch.nn as nn

from repro.train.precise_bn import recalibrate_batchnorm


def test_running_statistics_become_the_average_of_the_batches_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.fill_(5.0)  # stale statistics, as after a few fast-moving steps
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) for i in range(3)]
    used = recalibrate_batchnorm(model, iter(batches + [torch.randn(8, 3, 6, 6) * 100]), max_batches=3)
    assert used == 3 and not model.training  # the mode is restored; the fourth batch is not read
    assert model[1].momentum == 0.1  # the layer's own momentum is restored
    with torch.no_grad():
        inputs = [model[0](b) for b in batches]
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    want_var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, want_mean)
    torch.testing.assert_close(model[1].running_var, want_var)


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Linear(3, 2)
    assert recalibrate_batchnorm(model, iter([torch.randn(2, 3)]), max_batches=4) == 0
