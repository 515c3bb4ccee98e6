"""One way to build every network: ``create_model(name, num_classes=...)``.

Model families register factories in ``MODELS`` (``@register_model("resnet20")``). A factory takes
``num_classes`` plus keyword arguments and returns an ``nn.Module``. The registry imports every module of this
package before its first lookup (``repro.core.registry``), so a new family is one new file here: no list to edit.

Feature contract (used by feature-based methods such as CRD and ITRD, never by per-model code):
``model(x, is_feat=True, preact=False)`` returns ``(features, logits)`` where ``features`` is a list of stage
outputs, the last one being the pooled, flattened penultimate vector; ``preact=True`` returns the stage
outputs before their final ReLU (RepDistiller's ``is_feat``/``preact``). ``model(x)`` returns logits.
Models that do not speak this contract natively (timm, torchvision) are wrapped by their family module.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from repro.core.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", package=__name__)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    return MODELS.register(name)


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a registered model; an unknown name raises ReproError naming it and the known names."""
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def model_names() -> list[str]:
    return MODELS.names()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
