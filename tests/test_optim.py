"""The optimizer factories equal the official ones: timm's create_optimizer as deit main.py calls it."""
from __future__ import annotations

import torch
import torch.nn as nn

from repro.models import create_model
from repro.train.optim import OPTIMIZERS
from repro.train.config import OptimizerConfig


def _decay_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_timm_sgd_is_timms_create_optimizer_for_deits_sgd():
    """deit main.py: create_optimizer(args, model) with --opt sgd: Nesterov SGD, no weight decay on biases, 1-d
    parameters (norm weights) and model.no_weight_decay() (pos_embed, cls_token); timm's own factory on the model
    is the reference."""
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = create_model("vit_smoke_tiny", num_classes=10)
    cfg = OptimizerConfig(name="timm_sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    ours = OPTIMIZERS.get("timm_sgd")([model], cfg, 0.015)
    reference = create_optimizer_v2(model, opt="sgd", lr=0.015, weight_decay=1e-4, momentum=0.9)
    assert isinstance(ours, torch.optim.SGD) and isinstance(reference, torch.optim.SGD)
    assert _decay_by_name(model, ours) == _decay_by_name(model, reference)
    decay = _decay_by_name(model, ours)
    skipped = {n for n, wd in decay.items() if wd == 0.0}
    assert {"vit.pos_embed", "vit.cls_token"} <= skipped  # the wrapper names them under vit.
    assert all(n.endswith(".bias") or n in model.no_weight_decay() or model.get_parameter(n).ndim <= 1
               for n in skipped)
    assert any(wd == 1e-4 for wd in decay.values())
    for group in ours.param_groups:
        assert group["nesterov"] is True and group["momentum"] == 0.9 and group["lr"] == 0.015


def test_plain_sgd_keeps_repdistillers_decay_on_every_parameter():
    model = create_model("resnet8", num_classes=10)
    cfg = OptimizerConfig(name="sgd", lr=0.05, weight_decay=5e-4)
    optimizer = OPTIMIZERS.get("sgd")([model], cfg, 0.05)
    assert set(_decay_by_name(model, optimizer).values()) == {5e-4}
    assert optimizer.param_groups[0]["nesterov"] is False
