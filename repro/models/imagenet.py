"""ImageNet CNNs of the WTTM ImageNet tables (Tables 5 and 7), and the DeiT III teacher of Table 13.

Registered names (``create_model(name, num_classes=..., pretrained=False, checkpoint=None)``):

* ``tv_resnet18``, ``tv_resnet34``, ``tv_resnet50``, ``tv_resnet101``, ``tv_resnet152``: torchvision's ImageNet
  ResNets (``tv_`` keeps them apart from the CIFAR ``resnet*`` zoo; timm and the DIST code use the same prefix).
  ``pretrained=True`` loads torchvision's ``IMAGENET1K_V1`` weights, whose documented top-1 (69.76, 73.31, 76.13,
  77.37, 78.31) are the teacher rows of WTTM Tables 5/7. The model *is* a ``torchvision.models.ResNet`` subclass,
  so its state-dict keys are torchvision's and torchvision checkpoints load as they are.
* ``mobilenet_v1``: MobileNet-V1 (Howard et al. 2017, width 1.0), built by timm (``mobilenetv1_100``) with ReLU
  activations as in the ReviewKD/DKD/mdistiller MobileNetV1 behind the 68.87 baseline; ``act_layer="relu6"``
  gives timm's own variant (the one its pretrained weights were trained with).
* ``deit3_small_patch16_224`` (timm's default tag, ``fb_in1k``), ``deit3_small_patch16_224.fb_in1k`` and
  ``deit3_small_patch16_224.fb_in22k_ft_in1k``: DeiT III-Small through the ViT family's factory.

Weights are never fetched as a side effect: ``pretrained=True`` first looks in the local cache (torch.hub's
``checkpoints`` folder for torchvision, the Hugging Face cache for timm) and, when the file is absent and the
network is off (``HF_HUB_OFFLINE``/``REPRO_OFFLINE`` set, or the host unreachable within a few seconds), fails at
once with one ReproError. ``checkpoint=<local file>`` is the offline path: any mismatch is one ReproError
(all through ``repro.models.weights``, the one weights loader).

Feature contract (``repro.models``): ``model(x, is_feat=True, preact=False)`` returns ``(features, logits)`` with
features = [stem, stage 1, ..., stage N, pooled penultimate vector]; ``preact=True`` gives each stem/stage output
before its final activation (read with a pre-hook on that activation, so the network code stays the library's).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import timm
import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv_resnet
from torchvision.models._api import WeightsEnum

from repro.core.errors import ReproError
from repro.models import MODELS, register_model
from repro.models.vit import build_timm_vit
from repro.models.weights import (check_weight_args, fit_state_dict, load_checkpoint, strip_prefixes,
                                  timm_pretrained, torchvision_state_dict)


# ----------------------------------------------------------------------------------------------------------
# the feature contract for networks that do not speak it natively

@contextmanager
def _inputs_of(activations: list[nn.Module]) -> Iterator[list[Optional[Tensor]]]:
    """While active, slot i holds the input of the *last* call of ``activations[i]`` (a pre-activation map).

    Activations run in place, so the input is cloned before the activation overwrites it. A block calls its
    activation module more than once (torchvision's BasicBlock reuses ``relu``); the last call is the block's
    output, which is the one kept.
    """
    captured: list[Optional[Tensor]] = [None] * len(activations)

    def keeper(slot: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[slot] = args[0].clone()

        return hook

    handles = [act.register_forward_pre_hook(keeper(i)) for i, act in enumerate(activations)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class FeatureResNet(tv_resnet.ResNet):
    """torchvision's ImageNet ResNet (same modules, same state-dict keys) under the repro feature contract."""

    def _final_activations(self) -> list[nn.Module]:
        # The stem's ReLU, then each stage's last block's ReLU (its last call is the residual sum's activation).
        return [self.relu, *(stage[-1].relu for stage in self._stages())]

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def get_classifier(self) -> nn.Module:
        """The linear head on the pooled feature (as the CIFAR zoo and timm expose it; SRRL reuses it)."""
        return self.fc

    def _forward_all(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for stage in self._stages():
            x = stage(x)
            feats.append(x)
        pooled = torch.flatten(self.avgpool(x), 1)
        return [*feats, pooled], self.fc(pooled)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        if not is_feat:
            return super().forward(x)
        if not preact:
            return self._forward_all(x)
        with _inputs_of(self._final_activations()) as pre:
            feats, logits = self._forward_all(x)
        return [*pre, feats[-1]], logits


class FeatureMobileNetV1(nn.Module):
    """timm's MobileNet-V1 (an ``EfficientNet`` module, kept whole in ``self.net``) under the feature contract."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def _final_activations(self) -> list[nn.Module]:
        # timm folds the activation into BatchNormAct2d (``.act``); a stage ends with its last block's bn2.
        return [self.net.bn1.act, *(stage[-1].bn2.act for stage in self.net.blocks)]

    def _forward_all(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        net = self.net
        x = net.bn1(net.conv_stem(x))
        feats = [x]
        for stage in net.blocks:
            x = stage(x)
            feats.append(x)
        x = net.bn2(net.conv_head(x))  # identities for MobileNet-V1; kept so the head is timm's own
        pooled = net.forward_head(x, pre_logits=True)
        return [*feats, pooled], net.get_classifier()(pooled)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        if not is_feat:
            return self.net(x)
        if not preact:
            return self._forward_all(x)
        with _inputs_of(self._final_activations()) as pre:
            feats, logits = self._forward_all(x)
        return [*pre, feats[-1]], logits


# ----------------------------------------------------------------------------------------------------------
# factories

_TV_RESNETS: dict[str, tuple[type[nn.Module], list[int], WeightsEnum]] = {
    "tv_resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2], tv_resnet.ResNet18_Weights.IMAGENET1K_V1),
    "tv_resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3], tv_resnet.ResNet34_Weights.IMAGENET1K_V1),
    "tv_resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3], tv_resnet.ResNet50_Weights.IMAGENET1K_V1),
    "tv_resnet101": (tv_resnet.Bottleneck, [3, 4, 23, 3], tv_resnet.ResNet101_Weights.IMAGENET1K_V1),
    "tv_resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3], tv_resnet.ResNet152_Weights.IMAGENET1K_V1),
}


def build_tv_resnet(name: str, num_classes: int = 1000, pretrained: bool = False,
                    checkpoint: Optional[str] = None) -> FeatureResNet:
    """A torchvision ImageNet ResNet by registry name (``tv_resnet18`` ... ``tv_resnet152``)."""
    if name not in _TV_RESNETS:
        raise ReproError(f"unknown torchvision ResNet {name!r}; known: {', '.join(_TV_RESNETS)}")
    check_weight_args(name, pretrained, checkpoint)
    block, layers, weights = _TV_RESNETS[name]
    model = FeatureResNet(block, layers, num_classes=num_classes)
    if pretrained:
        state = strip_prefixes(torchvision_state_dict(weights), model.state_dict().keys())
        fit_state_dict(model, state, f"torchvision weights {weights}", strict=False)
    elif checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def build_mobilenet_v1(num_classes: int = 1000, pretrained: bool = False, checkpoint: Optional[str] = None,
                       act_layer: str = "relu", **timm_kwargs: Any) -> FeatureMobileNetV1:
    """MobileNet-V1 1.0 from timm's ``mobilenetv1_100`` definition (ReLU by default, see the module docstring)."""
    check_weight_args("mobilenet_v1", pretrained, checkpoint)
    kwargs = dict(num_classes=num_classes, act_layer=act_layer, **timm_kwargs)
    if pretrained:
        if act_layer != "relu6":
            raise ReproError("mobilenet_v1: timm's pretrained MobileNet-V1 weights were trained with ReLU6; "
                             "pass act_layer='relu6' with pretrained=True (or a ReLU checkpoint=<local file>)")
        net = timm_pretrained("mobilenetv1_100.ra4_e3600_r224_in1k", **kwargs)
    else:
        net = timm.create_model("mobilenetv1_100", **kwargs)
    model = FeatureMobileNetV1(net)
    if checkpoint:
        load_checkpoint(net, checkpoint)  # timm keys; this wrapper's own "net." prefix is stripped
    return model


def _tv_factory(name: str) -> Callable[..., FeatureResNet]:
    def factory(num_classes: int = 1000, pretrained: bool = False, checkpoint: Optional[str] = None) -> FeatureResNet:
        return build_tv_resnet(name, num_classes, pretrained, checkpoint)

    factory.__name__ = name
    return factory


def _deit3_factory(timm_name: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        return build_timm_vit(timm_name, num_classes, **kwargs)

    factory.__name__ = timm_name
    return factory


for _name in _TV_RESNETS:
    register_model(_name)(_tv_factory(_name))
register_model("mobilenet_v1")(build_mobilenet_v1)

# DeiT III-Small (WTTM Table 13's teacher): the ViT family does not register it (yet); skip names it already has.
for _name in ("deit3_small_patch16_224", "deit3_small_patch16_224.fb_in1k", "deit3_small_patch16_224.fb_in22k_ft_in1k"):
    if _name not in MODELS:
        register_model(_name)(_deit3_factory(_name))
