"""CTKD (repro.losses.ctkd, term ``ctkd``): the gradient reversal, the cosine curriculum against values computed
by hand from the official ``CosineDecay(max 0, min -1, loops)``, the learned temperature's formula, and KD / DKD
at a tensor temperature against the float-temperature losses."""
from __future__ import annotations

import math

import pytest
import torch

from repro.core.errors import ReproError
from repro.losses import dkd_loss, kd_loss
from repro.losses.ctkd import curriculum_temperature, reverse_gradient, reversal_strength
from repro.data.batch import Batch
from repro.methods import Outputs, TermContext, get_term

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reversal_is_identity_forward_and_minus_lambda_backward() -> None:
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y.detach(), x.detach())
    (y * torch.tensor([2.0, 5.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.25], dtype=torch.float64))


@pytest.mark.parametrize("strength", [0.0, 0.0954915, 0.5, 1.0])
def test_temperature_gradient_is_minus_lambda_times_the_loss_gradient(strength: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 2, 4, 5])
    for loss_of in (lambda t: kd_loss(student, teacher, t), lambda t: dkd_loss(student, teacher, labels, 1.0, 0.5, t)):
        theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        loss_of(curriculum_temperature(theta, strength)).backward()
        reversed_grad, student_grad = theta.grad.clone(), student.grad.clone()
        student.grad = None
        plain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        loss_of(1.0 + 20.0 * torch.sigmoid(plain)).backward()
        torch.testing.assert_close(reversed_grad, -strength * plain.grad)
        torch.testing.assert_close(student_grad, student.grad)  # the student's gradient is not reversed
        student.grad = None
        assert plain.grad.abs() > 0


def test_curriculum_matches_the_official_cosine_decay_by_hand() -> None:
    # CosineDecay(max_value=0, min_value=-1, num_loops=5).get_value(e) = (cos(e pi / 5) + 1) / 2 - 1, clamped to
    # e in [0, 5]; the official reversal multiplies the gradient by that (negative) value.
    official = {0: 0.0, 1: -0.0954915, 2: -0.3454915, 3: -0.6545085, 4: -0.9045085, 5: -1.0, 6: -1.0, 120: -1.0}
    for epoch, value in official.items():
        assert reversal_strength(epoch, 5) == pytest.approx(-value, abs=1e-7)
    assert reversal_strength(5, 10) == pytest.approx(0.5)  # CIFAR's 10 loops: halfway at epoch 5


def test_learned_temperature_starts_at_one_plus_twenty_sigmoid_one() -> None:
    ctx = TermContext(student=torch.nn.Identity(), teacher=torch.nn.Identity(), num_classes=6,
                      train_labels=torch.arange(6), device=torch.device("cpu"), epochs=10)
    term = get_term("ctkd")(ctx, base="dkd", alpha=1.0, beta=1.0)
    assert term.temperature(1).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    assert term.report() == {"base": "dkd", "temperature": pytest.approx(15.621172, rel=1e-6)}
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    labels = torch.tensor([1, 0, 5])
    batch = Batch(images=torch.zeros(3, 1), targets=labels, labels=labels, indices=torch.arange(3), epoch=2)
    value = term(Outputs(logits=student, teacher_logits=teacher), batch)
    tau = 1 + 20 / (1 + math.exp(-1))
    assert value.item() == pytest.approx(dkd_loss(student, teacher, labels, 1.0, 1.0, tau).item(), rel=1e-5)
    kd_term = get_term("ctkd")(ctx)
    assert kd_term(Outputs(logits=student, teacher_logits=teacher), batch).item() == \
        pytest.approx(kd_loss(student, teacher, tau).item(), rel=1e-5)
    with pytest.raises(ReproError, match="only with base: dkd"):
        get_term("ctkd")(ctx, base="kd", beta=1.0)
