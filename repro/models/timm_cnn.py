"""timm CNNs used as logit teachers: DeiT's RegNetY-16GF (``regnety_160.deit_in1k``, ssta.md 2.4 and 3.1) and
a tiny RegNetY of the same timm class for the smoke tier.

DeiT distils its students from RegNetY-16GF through the dist token (hard labels, ``--teacher-model
regnety_160``); the weights DeiT trained are timm's ``regnety_160.deit_in1k`` (also
``https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth``). As for the ViTs, nothing is fetched unless
``pretrained=True`` and the hub (or the local Hugging Face cache) has them; ``checkpoint=<local file>`` is the
offline path, loaded strictly (``repro.models.weights``: every weight, classifier included, must fit).

Feature contract: ``model(x, is_feat=True)`` returns ``(stage outputs + [pooled vector], logits)``; timm's
stages end in their activation, so ``preact`` is ignored (no pre-activation features).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import timm
import torch.nn as nn
from timm.models.regnet import RegNet, RegNetCfg
from torch import Tensor

from repro.core.errors import ReproError
from repro.models import register_model
from repro.models.weights import check_weight_args, load_checkpoint, timm_pretrained


class TimmCNN(nn.Module):
    """A timm CNN under the repro feature contract (``self.net`` is the timm model)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        if not is_feat:
            return self.net(x)
        final, stages = self.net.forward_intermediates(x)
        pooled = self.net.forward_head(final, pre_logits=True)
        return [*stages, pooled], self.net.forward_head(final)


def build_timm_cnn(timm_name: str, num_classes: int, pretrained: bool = False, checkpoint: Optional[str] = None,
                   drop_path_rate: float = 0.0, **timm_kwargs: Any) -> TimmCNN:
    """A timm CNN by name (``regnety_160.deit_in1k``), wrapped; weights from the hub cache or a local file."""
    check_weight_args(timm_name, pretrained, checkpoint)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)
    try:
        net = timm_pretrained(timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model" and bad-argument errors
        raise ReproError(f"timm could not build {timm_name!r}: {err}") from None
    if checkpoint:
        load_checkpoint(net, checkpoint, strict=True)  # a teacher: the file must be exactly the network
    return TimmCNN(net)


def _named_factory(timm_name: str) -> Callable[..., TimmCNN]:
    def factory(num_classes: int = 1000, **kwargs: Any) -> TimmCNN:
        return build_timm_cnn(timm_name, num_classes, **kwargs)

    factory.__name__ = timm_name
    return factory


for _name in ("regnety_160", "regnety_160.deit_in1k"):
    register_model(_name)(_named_factory(_name))


# A RegNetY (SE blocks, group convs) small enough for 32-pixel smoke data: 4 stages, ~85k weights + classifier.
_SMOKE_REGNETY = RegNetCfg(depth=5, w0=16, wa=24.0, wm=2.0, group_size=8, se_ratio=0.25, stem_width=16)


@register_model("regnety_smoke")
def regnety_smoke(num_classes: int = 10, checkpoint: Optional[str] = None, pretrained: bool = False,
                  drop_path_rate: float = 0.0) -> TimmCNN:
    if pretrained:
        raise ReproError("regnety_smoke has no pretrained weights; pass checkpoint=<local file>")
    net = RegNet(_SMOKE_REGNETY, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if checkpoint:
        load_checkpoint(net, checkpoint, strict=True)  # a teacher: the file must be exactly the network
    return TimmCNN(net)
