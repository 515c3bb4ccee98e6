"""CIFAR ResNets (He et al. 2016, Sec. 4.2) under RepDistiller's names: resnet8 ... resnet110, resnet8x4, resnet32x4.

Layout (and therefore state-dict keys) follows RepDistiller's ``models/resnet.py``: a 3x3 stem
(``conv1``/``bn1``), three stages ``layer1..3`` of basic blocks (``convK``/``bnK``, projection shortcut
``downsample.0/1`` where the shape changes), a global average pool (RepDistiller's 8x8 window) and ``fc``.

This module also holds the two pieces every CIFAR family shares: ``CifarNet`` (the feature contract of
``repro.models``) and ``Stage`` (a block sequence that can also hand back its last block's pre-activation).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model


class CifarNet(nn.Module):
    """Base class of the zoo: subclasses compute the feature list, this class speaks the contract.

    ``forward(x)`` -> logits; ``forward(x, is_feat=True, preact=...)`` -> ``(features, logits)`` where the
    last feature is the pooled, flattened vector that the classifier reads (RepDistiller's ``is_feat``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._feature_dims: list[int] = []

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def init_like_repdistiller(self, linear_std: Optional[float]) -> None:
        """RepDistiller's explicit init of VGG, WRN and MobileNetV2: convs N(0, 2/(k*k*out)) with zero bias, BN 1/0,
        Linear zero bias and N(0, linear_std^2) weights (``None``: the Linear keeps torch's default, as in WRN).
        One loop in module order, so the RNG draws are those of the per-family copies it replaced."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if linear_std is not None:
                    nn.init.normal_(m.weight, 0.0, linear_std)
                nn.init.zeros_(m.bias)

    def feature_dims(self) -> list[int]:
        """Channels (or width, for the pooled vector) of each feature, known without a data pass."""
        return list(self._feature_dims)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        feats = self.forward_features(x, preact)
        logits = self.get_classifier()(feats[-1])
        return (feats, logits) if is_feat else logits


def global_avg_pool(x: Tensor) -> Tensor:
    """Average over the whole final map: RepDistiller's fixed windows (8 for ResNet/WRN, 4 for the ShuffleNets,
    input_size // 16 for MobileNetV2) are exactly the whole map at 32x32 inputs, where this is bitwise the same
    kernel call (tests/test_models_cifar.py); unlike them it also pools a 16x16 input's smaller map to 1x1 (the
    smoke tier's inputs) instead of failing."""
    return F.avg_pool2d(x, kernel_size=tuple(x.shape[-2:]))


class GlobalAvgPool2d(nn.Module):
    """``global_avg_pool`` as a module (no parameters: the state-dict keys are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return global_avg_pool(x)


class Stage(nn.Sequential):
    """A sequence of blocks; ``forward_with_preact`` also returns the last block's output before its ReLU.

    Blocks of the residual families expose ``forward_with_preact(x) -> (out, preact)``; only the last
    block's pre-activation is a RepDistiller feature, so the others run their plain ``forward``.
    Subclassing ``nn.Sequential`` keeps the state-dict keys ``layerN.<i>.*``.
    """

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        *body, last = list(self)
        for block in body:
            x = block(x)
        return last.forward_with_preact(x)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut, then ReLU (the pre-ReLU sum is the block's pre-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # RepDistiller names the projection shortcut ``downsample`` (1x1 conv + BN) and omits it otherwise.
        needs_projection = stride != 1 or in_planes != planes
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            if needs_projection
            else None
        )

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class CifarResNet(CifarNet):
    """ResNet-(6n+2) for 32x32 inputs; ``widths`` = [stem, stage1, stage2, stage3] channels."""

    def __init__(self, depth: int, widths: list[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.avgpool = GlobalAvgPool2d()  # RepDistiller's AvgPool2d(8): the whole 8x8 map of a 32x32 input
        self.fc = nn.Linear(widths[3], num_classes)
        self._feature_dims = [widths[0], widths[1], widths[2], widths[3], widths[3]]
        init_conv_kaiming_fan_out(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> Stage:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return Stage(*blocks)

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1.forward_with_preact(f0)
        f2, f2_pre = self.layer2.forward_with_preact(f1)
        f3, f3_pre = self.layer3.forward_with_preact(f2)
        pooled = self.avgpool(f3).flatten(1)
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, pooled]
        return [f0, f1, f2, f3, pooled]

    def get_classifier(self) -> nn.Module:
        return self.fc


def init_conv_kaiming_fan_out(model: nn.Module) -> None:
    """RepDistiller's ResNet init: He-normal (fan_out) convs, BN weight 1 / bias 0, default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_NARROW = [16, 16, 32, 64]
_WIDE_X4 = [32, 64, 128, 256]


def _register_resnet(name: str, depth: int, widths: list[int]) -> None:
    def factory(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes=num_classes, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth} with channels {widths} (RepDistiller's ``{name}``)."
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, _NARROW)
_register_resnet("resnet8x4", 8, _WIDE_X4)
_register_resnet("resnet32x4", 32, _WIDE_X4)
