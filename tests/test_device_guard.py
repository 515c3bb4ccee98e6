"""Guard: ``Distiller.forward_train`` and every registered loss term run on the run's device only.

Everything (models, batch, the terms' own state) lives on the ``meta`` device, which has no data: a tensor a term
makes on the CPU (a factory call without ``device=``, a ``.cpu()``) meets meta tensors and torch raises, exactly
as it would against CUDA tensors on a GPU. Forward and backward both run.

Terms that read data on the host (a data-dependent shape or branch) cannot run on meta, which has no values. They
run on the CPU with torch's default device set to ``meta`` instead (the *fake device*): a tensor made without an
explicit device lands on meta and meets the term's CPU tensors, so the same mistake still fails the test. The
reason is named in each case; no term is skipped.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch
import torch.nn as nn

from repro.data.batch import Batch
from repro.methods import LOSS_TERMS, Distiller, TermContext, get_term
from repro.methods.base import forward_model
from repro.models import create_model

META = torch.device("meta")
CPU = torch.device("cpu")
CLASSES = 5


@dataclass
class Case:
    student: str = "resnet8"
    teacher: Optional[str] = "resnet14"
    params: dict[str, Any] = field(default_factory=dict)
    student_classes: int = CLASSES
    ta: Optional[str] = None  # an assistant (SSTA's teaching assistant)
    fake_device: Optional[str] = None  # why the term cannot run on meta: it runs on the fake device instead


CASES: dict[str, Case] = {
    "ce": Case(teacher=None, params={"label_smoothing": 0.1}),
    "kd": Case(),
    "ttm": Case(params={"gamma": 0.2}),
    "wttm": Case(params={"gamma": 0.2}),
    "wttm (weight_by_mean_u)": Case(params={"gamma": 0.2, "weight_by_mean_u": True, "mean_u_batches": 1},
                                    fake_device="U_bar is read to the host (float) once, at construction"),
    "dist": Case(),
    "dkd": Case(),
    "itrd": Case(),
    "crd": Case(params={"k": 4}, fake_device="negative sampling reads the fewest candidates per row to the host "
                                             "(int) and the constructor counts the classes (unique)"),
    "reviewkd": Case(params={"stages": 3}),
    "srrl": Case(),
    "kdpp": Case(student="resnet8x4", params={"kd_weight": 2.0},
                 fake_device="the class-mean counts are read to the host (int) once, at construction, for the "
                             "term's report"),
    "masked_recon": Case(student="vit_smoke_tiny", teacher=None),
    "ssta_attn": Case(student="vit_smoke_tiny", teacher="vit_smoke_small", ta="vit_smoke_tiny",
                      params={"teacher_head": 0, "ta_head": 1}),
    "ssta_attn (auto heads)": Case(student="vit_smoke_tiny", teacher="vit_smoke_small", ta="vit_smoke_tiny",
                                   params={"head_batches": 1, "teacher_importance_loss": "ce"},
                                   fake_device="choosing heads reads importance scores to the host"),
    "deit_hard": Case(student="vit_smoke_tiny_distilled", teacher="resnet8"),
    "deit_soft": Case(student="vit_smoke_tiny_distilled", teacher="resnet8", params={"temperature": 3.0}),
    "nkd": Case(params={"gamma": 1.0}),
    "ctkd": Case(),
    "ctkd (dkd)": Case(params={"base": "dkd", "alpha": 1.0, "beta": 1.0}),
    "vitkd": Case(student="vit_smoke_tiny", teacher="vit_smoke_small"),
    "sp": Case(),
    "cc": Case(),
    "nst": Case(student="ShuffleV1", teacher="wrn_16_2"),  # other widths and spatial sizes: pooling runs
    "ab": Case(student="ShuffleV1", teacher="wrn_16_2"),  # real connectors (strided/transposed convs)
    "ft": Case(student="ShuffleV1", teacher="wrn_16_2"),
    "fsp": Case(),
    "fitnet": Case(student="ShuffleV1", teacher="wrn_16_2"),  # a strided/transposed regressor between shapes
    "at": Case(),
    "vid": Case(student="ShuffleV1", teacher="wrn_16_2"),
    "rkd": Case(),
    "pkt": Case(),
}


def _term_name(case: str) -> str:
    return case.split(" ")[0]


def test_every_registered_term_has_a_case():
    shipped = {name for name, cls in LOSS_TERMS.items() if cls.__module__.startswith("repro.")}
    assert shipped == {_term_name(c) for c in CASES}, "add a Case for every loss term the suite ships"


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _feature_shapes(model: Optional[nn.Module], device: torch.device, preact: bool) -> list[tuple[int, ...]]:
    if model is None or not hasattr(model, "vit") and "is_feat" not in model.forward.__code__.co_varnames:
        return []
    was = model.training
    model.eval()
    with torch.no_grad():
        _, feats = forward_model(model, torch.zeros(2, 3, 32, 32, device=device), True, preact)
    model.train(was)
    return [tuple(int(d) for d in f.shape[1:]) for f in feats or []]


def _feature_dims(model: Optional[nn.Module], device: torch.device, preact: bool) -> list[int]:
    return [shape[0] for shape in _feature_shapes(model, device, preact)]


def _batch(device: torch.device, n: int = 4) -> Batch:
    labels = torch.arange(n, device=device) % CLASSES
    return Batch(images=torch.randn(n, 3, 32, 32, device=device), targets=labels, labels=labels,
                 indices=torch.arange(n, device=device), epoch=1)


@pytest.fixture(autouse=True)
def autocast_off_on_meta(monkeypatch):
    """torch has no autocast for meta; the terms only ever *disable* it (float32 islands), which outside an
    autocast region is a no-op: on meta it is one here too."""
    original = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any):
        if device_type == "meta":
            assert kwargs.get("enabled", args[1] if len(args) > 1 else True) is False, "autocast on meta"
            return nullcontext()
        return original(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


def _run(case: Case, name: str, device: torch.device, fake: bool = False) -> None:
    torch.manual_seed(0)
    student = create_model(case.student, num_classes=case.student_classes).to(device).train()
    teacher = _frozen(create_model(case.teacher, num_classes=CLASSES).to(device)) if case.teacher else None
    assistants = {"ta": _frozen(create_model(case.ta, num_classes=0).to(device))} if case.ta else {}
    cls = get_term(name)
    preact = cls.features == "preact"
    wants_feats = cls.features is not None
    train_labels = torch.arange(16, device=device) % CLASSES
    samples = [_batch(device) for _ in range(2)]

    def sample_batches(n: int):
        yield from samples[:n]

    ctx = TermContext(student=student, teacher=teacher, num_classes=CLASSES, train_labels=train_labels,
                      device=device, epochs=2, assistants=assistants, sample_batches=sample_batches,
                      student_feat_dims=_feature_dims(student, device, preact) if wants_feats else [],
                      teacher_feat_dims=_feature_dims(teacher, device, preact) if wants_feats else [],
                      student_feat_shapes=_feature_shapes(student, device, preact) if wants_feats else [],
                      teacher_feat_shapes=_feature_shapes(teacher, device, preact) if wants_feats else [])
    batch = _batch(device)
    # The fake device: real CPU tensors everywhere, but a tensor the term makes without a device lands on meta.
    with torch.device("meta") if fake else nullcontext():
        terms = {"ce": (1.0, get_term("ce")(ctx)), name: (1.0, cls(ctx, **case.params).to(device))}
        distiller = Distiller(student, teacher, terms)
        logits, losses = distiller.forward_train(batch)
        assert logits.device == device
        for term, value in losses.items():
            assert value.device == device and value.dim() == 0, term
        sum(losses.values()).backward()
        if terms[name][1].init_stage() is not None:  # the initialisation stage's loss too (AB, FT, FSP)
            from repro.methods import Outputs

            s_logits, s_feats = forward_model(student, batch.images, True, preact)
            with torch.no_grad():
                t_logits, t_feats = forward_model(teacher, batch.images, True, preact)
            init_loss = terms[name][1].init_loss(Outputs(s_logits, s_feats, t_logits, t_feats), batch)
            assert init_loss.device == device and init_loss.dim() == 0
            init_loss.backward()
    for p in list(student.parameters()) + list(distiller.terms.parameters()):
        if p.grad is not None:
            assert p.grad.device == device


@pytest.mark.parametrize("case", sorted(CASES))
def test_distiller_and_term_stay_on_the_device(case):
    spec = CASES[case]
    name = _term_name(case)
    if spec.fake_device is None:
        _run(spec, name, META)
    else:
        _run(spec, name, CPU, fake=True)


def test_the_guard_catches_a_tensor_made_on_the_cpu():
    """The guard is not vacuous: a term that makes a CPU tensor fails it, on meta and on the fake device."""

    class Careless(get_term("kd")):
        def forward(self, out, batch):
            return super().forward(out, batch) + (torch.zeros(out.logits.shape[0]) * out.logits[:, 0]).mean()

    LOSS_TERMS._entries["test_careless"] = Careless
    try:
        for device, fake in ((META, False), (CPU, True)):
            with pytest.raises(RuntimeError, match="device"):
                _run(Case(), "test_careless", device, fake)
    finally:
        del LOSS_TERMS._entries["test_careless"]
