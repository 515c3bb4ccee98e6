"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR under RepDistiller's names: wrn_16_1/2, wrn_40_1/2.

Layout and keys follow RepDistiller's ``models/wrn.py``: stem ``conv1``, three ``blockK.layer.<i>`` stages of
pre-activation blocks (``bn1, conv1, bn2, conv2`` and ``convShortcut`` when the width changes), a final
``bn1`` + ReLU, 8x8 average pool and ``fc``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet, global_avg_pool


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-(dropout)-conv, plus identity or 1x1 projection."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # As in the original, an equal-width block uses the identity even when it strides (never happens here).
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        # A projecting block feeds the *activated* input to its shortcut; an identity block adds the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One stage; the extra ``layer`` level is there only so the keys read ``blockK.layer.<i>.*``."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(num_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._feature_dims = [widths[0], widths[1], widths[2], widths[3], widths[3]]
        self.init_like_repdistiller(linear_std=None)

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        pooled = global_avg_pool(F.relu(self.bn1(f3))).flatten(1)  # RepDistiller: avg_pool2d(..., 8)
        if preact:
            # RepDistiller's "pre-activation" WRN features are the stage outputs passed through the BN that
            # precedes the next ReLU. Like the original, this re-runs those BNs, so in train mode their
            # running statistics are updated a second time; kept for fidelity to the reported numbers.
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return [f0, f1, f2, f3, pooled]

    def get_classifier(self) -> nn.Module:
        return self.fc


def _register_wrn(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    def factory(num_classes: int = 100, **kwargs: Any) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes=num_classes, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen_factor} for CIFAR (RepDistiller's ``{name}``)."
    register_model(name)(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
