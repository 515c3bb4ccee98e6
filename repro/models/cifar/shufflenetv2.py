"""ShuffleNet V2 (Ma et al. 2018) for CIFAR as RepDistiller's ``ShuffleV2`` (net size 1: 116/232/464, 1024).

Layout and keys follow RepDistiller's ``models/ShuffleNetv2.py``: a 1x1 stem ``conv1``/``bn1`` to 24 channels,
three stages ``layer1..3`` each starting with a stride-2 down-sampling unit (``conv1..5``/``bn1..5``) followed
by [3, 7, 3] channel-split units (``conv1..3``/``bn1..3``), a 1x1 ``conv2``/``bn2`` to 1024 channels, a 4x4
average pool and ``linear``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet, Stage, global_avg_pool
from repro.models.cifar.shufflenetv1 import channel_shuffle


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    groups = in_channels if depthwise else 1
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class SplitUnit(nn.Module):
    """Half the channels pass through; the other half goes 1x1 - depthwise 3x3 - 1x1; concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = _conv(half, half, 1)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _conv(half, half, 3, depthwise=True)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv(half, half, 1)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        passthrough, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        branch_pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([passthrough, F.relu(branch_pre)], dim=1), 2)
        # RepDistiller's pre-activation feature is the concatenation *before* the shuffle.
        return out, torch.cat([passthrough, branch_pre], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class DownUnit(nn.Module):
    """Stride-2 unit: both halves see the whole input (left: dw3x3-1x1; right: 1x1-dw3x3-1x1); concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = _conv(in_channels, in_channels, 3, stride=2, depthwise=True)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _conv(in_channels, mid, 1)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv(in_channels, mid, 1)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, stride=2, depthwise=True)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid, 1)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleNetV2(CifarNet):
    def __init__(
        self, widths: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int = 100
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, count in zip(widths[:3], num_blocks):
            stages.append(Stage(DownUnit(in_channels, channels), *[SplitUnit(channels) for _ in range(count)]))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self._feature_dims = [24, *widths[:3], widths[3]]

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1.forward_with_preact(f0)
        f2, f2_pre = self.layer2.forward_with_preact(f1)
        f3, f3_pre = self.layer3.forward_with_preact(f2)
        pooled = global_avg_pool(F.relu(self.bn2(self.conv2(f3)))).flatten(1)  # RepDistiller: avg_pool2d(..., 4)
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, pooled]
        return [f0, f1, f2, f3, pooled]

    def get_classifier(self) -> nn.Module:
        return self.linear


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int = 100, **kwargs: Any) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net size 1): widths (116, 232, 464, 1024), blocks (3, 7, 3); default init."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, **kwargs)
