"""ShuffleNet V1 (Zhang et al. 2018) for CIFAR as RepDistiller's ``ShuffleV1``: groups 3, widths 240/480/960.

Layout and keys follow RepDistiller's ``models/ShuffleNetv1.py``: a 1x1 stem ``conv1``/``bn1`` to 24 channels
(stride 1, no max pool), three stages ``layer1..3`` of blocks [4, 8, 4] (``conv{1,2,3}``/``bn{1,2,3}``; the
first block of each stage strides 2 and concatenates an average-pooled shortcut), a 4x4 average pool and
``linear``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet, Stage, global_avg_pool


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> interleave the g groups' channels (ShuffleNet's channel shuffle)."""
    n, channels, h, w = x.shape
    # reshape, not view: the input may be channels_last (non-contiguous in NCHW order).
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; add (stride 1) or concat (stride 2) the shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The stem has only 24 channels, so the first unit's 1x1 conv is not grouped (as in the paper).
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1)
        else:
            preact = out + x
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ShuffleNetV1(CifarNet):
    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for planes, count in zip(out_planes, num_blocks):
            # The strided first unit concatenates its input, so its branch only produces the difference.
            units = [ShuffleUnit(in_planes, planes - in_planes, stride=2, groups=groups)]
            units += [ShuffleUnit(planes, planes, stride=1, groups=groups) for _ in range(count - 1)]
            stages.append(Stage(*units))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(out_planes[2], num_classes)
        self._feature_dims = [24, *out_planes, out_planes[2]]

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1.forward_with_preact(f0)
        f2, f2_pre = self.layer2.forward_with_preact(f1)
        f3, f3_pre = self.layer3.forward_with_preact(f2)
        pooled = global_avg_pool(f3).flatten(1)  # RepDistiller: avg_pool2d(f3, 4)
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, pooled]
        return [f0, f1, f2, f3, pooled]

    def get_classifier(self) -> nn.Module:
        return self.linear


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int = 100, **kwargs: Any) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: out planes [240, 480, 960], blocks [4, 8, 4], 3 groups; default init."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes, **kwargs)
