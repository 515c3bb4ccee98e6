"""NKD, ViTKD, CTKD and the tables' combinations take one training step through the Distiller with the real
smoke-tier models of their specs (WTTM Table 5: torchvision ResNet-34 -> ResNet-18 at 32 px; Table 13: DeiT III-S
-> DeiT-Ti at 32 px with 8-px patches): the loss is finite and gradients reach the student and every trainable
parameter of the terms (CTKD's temperature; ViTKD's linear maps, mask token and generator)."""
from __future__ import annotations

import math

import pytest
import torch

from repro.data.batch import Batch
from repro.methods import Distiller, TermContext, get_term
from repro.methods.base import forward_model
from repro.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 10


def _models(kind: str):
    torch.manual_seed(0)
    if kind == "resnet":
        return create_model("tv_resnet18", num_classes=CLASSES), create_model("tv_resnet34", num_classes=CLASSES)
    args = dict(num_classes=CLASSES, img_size=32, patch_size=8)
    return (create_model("deit_tiny_patch16_224", **args),
            create_model("deit3_small_patch16_224.fb_in22k_ft_in1k", **args))


def _step(kind: str, losses: dict[str, dict]) -> tuple[Distiller, dict[str, torch.Tensor]]:
    student, teacher = _models(kind)
    teacher.eval()
    probe = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        dims = [[int(f.shape[1]) for f in forward_model(m.eval(), probe, True, False)[1]] for m in (student, teacher)]
    student.train()
    ctx = TermContext(student=student, teacher=teacher, num_classes=CLASSES, train_labels=torch.arange(CLASSES),
                      device=torch.device("cpu"), epochs=2, image_size=32,
                      student_feat_dims=dims[0], teacher_feat_dims=dims[1])
    terms = {}
    for name, params in losses.items():
        params = dict(params)
        weight = params.pop("weight", 1.0)
        terms[name] = (weight, get_term(name)(ctx, **params))
    distiller = Distiller(student, teacher, terms).train()
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 3, 5, 9])
    batch = Batch(images=images, targets=labels, labels=labels, indices=torch.arange(4), epoch=1)
    _, parts = distiller.forward_train(batch)
    loss = sum(parts.values())
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    return distiller, parts


def _has_grad(module: torch.nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("losses", [
    {"ce": {}, "nkd": {"temperature": 1.0, "gamma": 1.5}},
    {"ce": {}, "ctkd": {"base": "dkd", "alpha": 1.0, "beta": 1.0, "loops": 5}},
], ids=["nkd", "ctkd"])
def test_resnet_terms_train_a_step(losses: dict) -> None:
    distiller, parts = _step("resnet", losses)
    assert set(parts) == set(losses)
    assert _has_grad(distiller.student)
    if "ctkd" in losses:
        theta = distiller.terms["ctkd"].theta
        # epoch 1 of 5: lambda = (1 - cos(pi/5))/2 > 0, so the temperature gets a (reversed) gradient
        assert theta.grad is not None and theta.grad.abs() > 0


@pytest.mark.parametrize("losses", [
    {"ce": {}, "vitkd": {}},
    {"ce": {}, "nkd": {"gamma": 1.0}, "vitkd": {}},
    {"ce": {}, "wttm": {"gamma": 0.8, "weight": 1.6}, "vitkd": {}},
], ids=["vitkd", "nkd+vitkd", "wttm+vitkd"])
def test_deit_terms_train_a_step(losses: dict) -> None:
    distiller, parts = _step("deit", losses)
    assert set(parts) == set(losses)
    assert _has_grad(distiller.student)
    vitkd = distiller.terms["vitkd"]
    for module in (*vitkd.align_shallow, vitkd.align_last, vitkd.generator):
        assert _has_grad(module)
