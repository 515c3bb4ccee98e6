"""MobileNetV2 (Sandler et al. 2018) for CIFAR as RepDistiller's ``mobile_half``: expansion 6, width 0.5.

Registered as ``MobileNetV2`` (the name WTTM's and mdistiller's tables use) and ``mobile_half`` (RepDistiller's).
Layout and keys follow RepDistiller's ``models/mobilenetv2.py``: stem ``conv1.{0,1}`` (3x3, stride 2),
``blocks.<stage>.<i>.conv.{0..7}`` inverted residuals (the expansion 1x1 conv is kept even at t=1),
``conv2.{0,1}`` to 1280 channels, average pool, ``classifier.0``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet, GlobalAvgPool2d

# (expansion t, output channels c, repeats n, first stride s) per stage; "T" stands for the expansion argument.
_STAGES: list[tuple[str | int, int, int, int]] = [
    (1, 16, 1, 1),
    ("T", 24, 2, 1),
    ("T", 32, 3, 2),
    ("T", 64, 4, 2),
    ("T", 96, 3, 1),
    ("T", 160, 3, 2),
    ("T", 320, 1, 1),
]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; identity shortcut when shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(CifarNet):
    def __init__(
        self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, input_size: int = 32
    ) -> None:
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"MobileNetV2 needs an input size divisible by 32, got {input_size}")
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        stages = []
        for t, c, n, s in _STAGES:
            out_channels = int(c * width_mult)
            ratio = expansion if t == "T" else int(t)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, ratio))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last_channel, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        # The network downsamples by 16 in total; RepDistiller's AvgPool2d(input_size // 16, ceil_mode=True) is
        # then the whole final map, which is what this pools (at any input size).
        self.avgpool = GlobalAvgPool2d()
        stage_channels = [int(c * width_mult) for _, c, _, _ in _STAGES]
        self._feature_dims = [int(32 * width_mult)] + [stage_channels[i] for i in (1, 2, 4, 6)] + [last_channel]
        self.init_like_repdistiller(linear_std=0.01)

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        # Stage outputs end in a linear (BN, no ReLU) projection, so RepDistiller returns the same list for
        # ``preact`` and plain features; so do we.
        f0 = self.conv1(x)
        out = self.blocks[1](self.blocks[0](f0))
        f1 = out
        out = self.blocks[2](out)
        f2 = out
        out = self.blocks[4](self.blocks[3](out))
        f3 = out
        out = self.blocks[6](self.blocks[5](out))
        f4 = out
        pooled = self.avgpool(self.conv2(out)).flatten(1)
        return [f0, f1, f2, f3, f4, pooled]

    def get_classifier(self) -> nn.Module:
        return self.classifier


def mobile_half(num_classes: int = 100, **kwargs: Any) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2 with expansion 6 and width multiplier 0.5."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes, **kwargs)


register_model("MobileNetV2")(mobile_half)
register_model("mobile_half")(mobile_half)
