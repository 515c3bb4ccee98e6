"""The CIFAR-style ResNet-50 of RepDistiller's ``models/resnetv2.py`` (registered as ``ResNet50``).

ImageNet bottleneck stages [3, 4, 6, 3] (widths 64..512, expansion 4) on a 3x3 stride-1 stem with no max pool,
adaptive average pool and a ``linear`` head. Keys: ``conv1``/``bn1``, ``layerK.<i>.{conv,bn}{1,2,3}``,
``layerK.<i>.shortcut.0/1`` for projections, ``linear``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet, Stage, init_conv_kaiming_fan_out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        needs_projection = stride != 1 or in_planes != out_planes
        self.shortcut: nn.Module = (
            nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))
            if needs_projection
            else nn.Identity()
        )

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class CifarBottleneckResNet(CifarNet):
    def __init__(self, num_blocks: list[int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [64, 128, 256, 512]
        in_planes = 64
        stages = []
        for index, (planes, count) in enumerate(zip(widths, num_blocks)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(count):
                blocks.append(Bottleneck(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(Stage(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_planes, num_classes)
        self._feature_dims = [64] + [w * Bottleneck.expansion for w in widths] + [in_planes]
        init_conv_kaiming_fan_out(self)

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1.forward_with_preact(f0)
        f2, f2_pre = self.layer2.forward_with_preact(f1)
        f3, f3_pre = self.layer3.forward_with_preact(f2)
        f4, f4_pre = self.layer4.forward_with_preact(f3)
        pooled = self.avgpool(f4).flatten(1)
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, pooled]
        return [f0, f1, f2, f3, f4, pooled]

    def get_classifier(self) -> nn.Module:
        return self.linear


@register_model("ResNet50")
def resnet50_cifar(num_classes: int = 100, **kwargs: Any) -> CifarBottleneckResNet:
    """RepDistiller's CIFAR ``ResNet50``: bottleneck blocks [3, 4, 6, 3], 3x3 stem, no max pool."""
    return CifarBottleneckResNet([3, 4, 6, 3], num_classes=num_classes, **kwargs)
