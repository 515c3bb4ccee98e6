"""VGG with BatchNorm for CIFAR under RepDistiller's names: vgg8, vgg11, vgg13, vgg16, vgg19 (its ``vgg*_bn``).

Layout and keys follow RepDistiller's ``models/vgg.py``: five conv groups ``block0..4``, each an
``nn.Sequential`` of (conv3x3 with bias, BN, ReLU) repeated, the group's final ReLU dropped (it is applied in
``forward`` so the pre-ReLU output can be a feature); 2x2 max pools between groups 0-3, a global average pool
and a single ``classifier`` Linear(512, classes). No fully connected hidden layers.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.models import register_model
from repro.models.cifar.resnet import CifarNet

# Output channels of each conv in each of the five groups (configurations A, B, D, E of Simonyan & Zisserman;
# "S" is RepDistiller's one-conv-per-group VGG-8).
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def conv_group(channels: list[int], in_channels: int) -> nn.Sequential:
    """(conv, BN, ReLU) per entry, without the trailing ReLU, so indices read conv=3i, bn=3i+1."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(True)]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class VGG(CifarNet):
    def __init__(self, config: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = [3] + [group[-1] for group in config[:-1]]
        self.block0 = conv_group(config[0], in_channels[0])
        self.block1 = conv_group(config[1], in_channels[1])
        self.block2 = conv_group(config[2], in_channels[2])
        self.block3 = conv_group(config[3], in_channels[3])
        self.block4 = conv_group(config[4], in_channels[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        self._feature_dims = [group[-1] for group in config] + [config[-1][-1]]
        self.init_like_repdistiller(linear_std=0.01)

    def forward_features(self, x: Tensor, preact: bool = False) -> list[Tensor]:
        height = x.shape[2]
        f0 = F.relu(self.block0(x))  # the first group's feature is post-ReLU in both modes, as in RepDistiller
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        # RepDistiller pools before the last group only for 64x64 inputs (Tiny-ImageNet); CIFAR keeps 4x4.
        f4_pre = self.block4(self.pool3(f3) if height == 64 else f3)
        f4 = F.relu(f4_pre)
        pooled = self.pool4(f4).flatten(1)
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, pooled]
        return [f0, f1, f2, f3, f4, pooled]

    def get_classifier(self) -> nn.Module:
        return self.classifier


def _register_vgg(name: str, config_key: str) -> None:
    def factory(num_classes: int = 100, **kwargs: Any) -> VGG:
        return VGG(VGG_CONFIGS[config_key], num_classes=num_classes, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"VGG config {config_key!r} with BatchNorm for CIFAR (RepDistiller's ``{name}_bn``)."
    register_model(name)(factory)


for _name, _key in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    _register_vgg(_name, _key)
