"""NKD (repro.losses.nkd, term ``nkd``) against the paper's formula in float64 and against values computed by
hand from cls_KD's ``NKDLoss``; soft-target labels; one training step through the Distiller."""
from __future__ import annotations

import math

import pytest
import torch

from repro.losses.nkd import nkd_loss
from repro.data.batch import Batch
from repro.methods import Outputs, TermContext, get_term

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_nkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float, gamma: float) -> float:
    """NKD Eq. (8) written sample by sample with ``math``: -T_t log S_t - gamma tau^2 sum_{i != t} T^_i log S^_i,
    where T^ and S^ are the non-target distributions at temperature tau, normalised over the K-1 other classes."""
    total = 0.0
    for z, v, t in zip(student.double().tolist(), teacher.double().tolist(), labels.tolist()):
        p_teacher = [math.exp(x) for x in v]
        p_student = [math.exp(x) for x in z]
        loss = -(p_teacher[t] / sum(p_teacher)) * math.log(p_student[t] / sum(p_student))
        others = [i for i in range(len(z)) if i != t]
        t_hat = [math.exp(v[i] / tau) for i in others]
        s_hat = [math.exp(z[i] / tau) for i in others]
        loss -= gamma * tau * tau * sum(a / sum(t_hat) * math.log(b / sum(s_hat)) for a, b in zip(t_hat, s_hat))
        total += loss
    return total / len(labels)


def random_case(seed: int, batch: int = 6, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen) * 2
    teacher = torch.randn(batch, classes, generator=gen) * 3
    labels = torch.randint(classes, (batch,), generator=gen)
    return student, teacher, labels


@pytest.mark.parametrize("tau,gamma", [(1.0, 1.5), (1.0, 1.0), (2.0, 1.5), (4.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nkd_matches_the_paper_formula(tau: float, gamma: float, seed: int) -> None:
    student, teacher, labels = random_case(seed)
    expected = paper_nkd(student, teacher, labels, tau, gamma)
    assert nkd_loss(student, teacher, labels, tau, gamma).item() == pytest.approx(expected, rel=1e-5)
    assert nkd_loss(student.double(), teacher.double(), labels, tau, gamma).item() == pytest.approx(expected, rel=1e-12)


def test_nkd_by_hand_from_the_official_code() -> None:
    # NKDLoss on one sample, 3 classes, label 0: student logits 0 (S = 1/3 each), teacher (log 2, 0, 0) gives
    # T = (1/2, 1/4, 1/4). loss_t = -(1/2) log(1/3); the non-target softmaxes over classes 1, 2 are both (1/2, 1/2),
    # so loss_non = -gamma * 1^2 * 2 * (1/2) log(1/2) = gamma log 2.
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    labels = torch.tensor([0])
    assert nkd_loss(student, teacher, labels, 1.0, 1.5).item() == pytest.approx(0.5 * math.log(3) + 1.5 * math.log(2))
    # Temperature 2 with teacher (0, 2 log 2, 0), label 2: T_t = 1/6; the non-target teacher at tau 2 is
    # softmax(0, log 2) = (1/3, 2/3), the student's (1/2, 1/2): loss_non = -gamma * 4 * log(1/2).
    teacher = torch.tensor([[0.0, 2 * math.log(2.0), 0.0]])
    expected = -(1 / 6) * math.log(1 / 3) + 1.0 * 4 * math.log(2)
    assert nkd_loss(student, teacher, torch.tensor([2]), 2.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_teacher_gets_no_gradient_and_student_does() -> None:
    student, teacher, labels = random_case(3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    nkd_loss(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_term_uses_the_argmax_of_soft_targets() -> None:
    student, teacher, labels = random_case(4, batch=4, classes=5)
    ctx = TermContext(student=torch.nn.Identity(), teacher=torch.nn.Identity(), num_classes=5,
                      train_labels=torch.arange(5), device=torch.device("cpu"), epochs=10)
    term = get_term("nkd")(ctx, temperature=1.0, gamma=1.0)
    other = (labels + 1) % 5
    soft = 0.7 * torch.nn.functional.one_hot(labels, 5).float() + 0.3 * torch.nn.functional.one_hot(other, 5).float()
    batch = Batch(images=torch.zeros(4, 1), targets=soft, labels=other, indices=torch.arange(4), epoch=1)
    out = Outputs(logits=student, teacher_logits=teacher)
    assert term(out, batch).item() == pytest.approx(paper_nkd(student, teacher, labels, 1.0, 1.0), rel=1e-5)
    hard = Batch(images=torch.zeros(4, 1), targets=labels, labels=labels, indices=torch.arange(4), epoch=1)
    assert term(out, hard).item() == pytest.approx(paper_nkd(student, teacher, labels, 1.0, 1.0), rel=1e-5)
