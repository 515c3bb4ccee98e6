"""KD / TTM / WTTM (repro.losses.logit) against independent float64 computations written the official way.

The references follow wttm.md 1.2-1.5 and the A.3 pseudo-code literally: softmax, then power, normalise by
U = sum softmax^gamma, ``F.kl_div(log q, p_hat, reduction='none').sum(1)``, batch mean; WTTM multiplies each
sample's KL by U. For teacher logit gaps above ~100, where that formula underflows in float32, the reference
is the closed form of a one-hot-like teacher.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repro.losses import kd_loss, ttm_loss, wttm_loss, wttm_weight

GAMMAS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
TEMPERATURES = (1.0, 2.0, 4.0, 10.0)


def official_ttm_parts(student: torch.Tensor, teacher: torch.Tensor, gamma: float, dtype=torch.float64):
    """Per-sample (KL, U) exactly as ``distiller_zoo/ttm.py`` / ``wttm.py`` compute them, in ``dtype``."""
    powered = F.softmax(teacher.to(dtype), dim=1) ** gamma
    u = powered.sum(dim=1, keepdim=True)
    p_hat = powered / u
    kl = F.kl_div(F.log_softmax(student.to(dtype), dim=1), p_hat, reduction="none").sum(dim=1)
    return kl, u.squeeze(1)


def official_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``DistillKL``: KL(softmax(v/T) || softmax(z/T)) summed, * T^2 / B, in float64."""
    log_q = F.log_softmax(student.double() / temperature, dim=1)
    p = F.softmax(teacher.double() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="sum") * temperature**2 / student.shape[0]


def random_logits(seed: int, batch: int = 16, classes: int = 100, scale: float = 3.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen) * scale
    teacher = torch.randn(batch, classes, generator=gen) * scale
    teacher[torch.arange(batch), torch.randint(classes, (batch,), generator=gen)] += 12.0  # a peaked teacher
    return student, teacher


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ttm_and_wttm_match_the_official_formula(gamma: float, seed: int) -> None:
    student, teacher = random_logits(seed)
    kl, u = official_ttm_parts(student, teacher, gamma)
    assert ttm_loss(student, teacher, gamma).item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert wttm_loss(student, teacher, gamma).item() == pytest.approx((u * kl).mean().item(), rel=1e-5)
    torch.testing.assert_close(wttm_weight(teacher, gamma).double(), u, rtol=1e-5, atol=0)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kd_matches_distill_kl(temperature: float, seed: int) -> None:
    student, teacher = random_logits(seed)
    expected = official_kd(student, teacher, temperature).item()
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_small_batch_and_few_classes() -> None:
    student, teacher = random_logits(3, batch=1, classes=2, scale=1.0)
    for gamma in GAMMAS:
        kl, u = official_ttm_parts(student, teacher, gamma)
        assert wttm_loss(student, teacher, gamma).item() == pytest.approx((u * kl).mean().item(), rel=1e-5)


def test_gamma_one_is_kd_at_t1_and_wttm_equals_ttm() -> None:
    # gamma = 1: p_hat = softmax(v), U = sum softmax = 1, and KD at T=1 has no scaling.
    student, teacher = random_logits(4)
    ttm = ttm_loss(student, teacher, 1.0)
    assert ttm.item() == pytest.approx(kd_loss(student, teacher, 1.0).item(), rel=1e-6)
    assert wttm_loss(student, teacher, 1.0).item() == pytest.approx(ttm.item(), rel=1e-6)


def test_ttm_is_kd_with_tempered_teacher_only() -> None:
    # TTM(gamma) = KL(softmax(v/T) || softmax(z)) with T = 1/gamma: untempered student, no T^2 (wttm.md 7.1).
    student, teacher = random_logits(5)
    gamma = 0.25
    p = F.softmax(teacher.double() * gamma, dim=1)
    expected = (p * (p.log() - F.log_softmax(student.double(), dim=1))).sum(1).mean()
    assert ttm_loss(student, teacher, gamma).item() == pytest.approx(expected.item(), rel=1e-5)
    assert ttm_loss(student, teacher, gamma).item() != pytest.approx(kd_loss(student, teacher, 4.0).item(), rel=1e-2)


# ------------------------------------------------------------------------ large gaps (official underflows)


def one_hot_like_teacher(batch: int, classes: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits with one entry ``gap`` above the rest (zeros), and the winning classes."""
    winners = torch.arange(batch) % classes
    teacher = torch.zeros(batch, classes)
    teacher[torch.arange(batch), winners] = gap
    return teacher, winners


def closed_form_ttm(student: torch.Tensor, winners: torch.Tensor, gap: float, gamma: float):
    """Exact per-sample (KL(p_hat || q), U) for the one-hot-like teacher, with math in float64.

    p_hat = softmax(gamma * v): winner 1 / (1 + (K-1) e^{-gamma gap}), others e^{-gamma gap} times that.
    U = sum softmax(v)^gamma = (1 + (K-1) e^{-gamma gap}) / (1 + (K-1) e^{-gap})^gamma.
    """
    classes = student.shape[1]
    log_norm_hat = math.log1p((classes - 1) * math.exp(-gamma * gap))
    log_p_hat = torch.full(student.shape, -gamma * gap - log_norm_hat, dtype=torch.float64)
    log_p_hat[torch.arange(student.shape[0]), winners] = -log_norm_hat
    log_q = F.log_softmax(student.double(), dim=1)
    kl = (log_p_hat.exp() * (log_p_hat - log_q)).sum(dim=1)
    u = math.exp(log_norm_hat - gamma * math.log1p((classes - 1) * math.exp(-gap)))
    return kl, torch.full((student.shape[0],), u, dtype=torch.float64)


@pytest.mark.parametrize("gap", [150.0, 300.0, 1000.0])
@pytest.mark.parametrize("gamma", [0.05, 0.1, 0.2, 0.5])
def test_large_teacher_gaps_stay_exact_in_float32(gap: float, gamma: float) -> None:
    student, _ = random_logits(6, batch=8, classes=100)
    teacher, winners = one_hot_like_teacher(8, 100, gap)
    kl, u = closed_form_ttm(student, winners, gap, gamma)
    ttm, wttm = ttm_loss(student, teacher, gamma), wttm_loss(student, teacher, gamma)
    weight = wttm_weight(teacher, gamma)
    assert all(torch.isfinite(x).all() for x in (ttm, wttm, weight))
    assert ttm.dtype == wttm.dtype == torch.float32
    assert ttm.item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert wttm.item() == pytest.approx((u * kl).mean().item(), rel=1e-5)
    torch.testing.assert_close(weight.double(), u, rtol=1e-6, atol=0)


def test_official_float32_formula_underflows_where_ours_does_not() -> None:
    # gap 200, gamma 0.05: the true p_hat keeps 99 * e^{-10} = 0.45% off the winner and U = 1.0045, but
    # softmax(v) in float32 is exactly one-hot, so the official formula sees U = 1 and a one-hot target.
    gap, gamma = 200.0, 0.05
    student, _ = random_logits(7, batch=8, classes=100)
    teacher, winners = one_hot_like_teacher(8, 100, gap)
    kl, u = closed_form_ttm(student, winners, gap, gamma)
    official_kl, official_u = official_ttm_parts(student, teacher, gamma, dtype=torch.float32)
    assert torch.all(official_u == 1.0)
    assert abs(official_kl.mean().item() - kl.mean().item()) > 1e-3 * kl.mean().item()
    assert u[0].item() == pytest.approx(1.0 + 99 * math.exp(-10.0), rel=1e-3)
    assert wttm_loss(student, teacher, gamma).item() == pytest.approx((u * kl).mean().item(), rel=1e-5)


# -------------------------------------------------------------------------------------------- U bounds


@pytest.mark.parametrize("gamma", GAMMAS)
def test_u_is_one_for_one_hot_and_k_power_for_uniform(gamma: float) -> None:
    classes = 100
    one_hot, _ = one_hot_like_teacher(4, classes, 1000.0)
    uniform = torch.full((4, classes), 3.7)
    torch.testing.assert_close(wttm_weight(one_hot, gamma), torch.ones(4))
    torch.testing.assert_close(wttm_weight(uniform, gamma), torch.full((4,), classes ** (1.0 - gamma)))
    _, teacher = random_logits(8, classes=classes)
    weight = wttm_weight(teacher, gamma)
    assert torch.all(weight >= 1.0 - 1e-6) and torch.all(weight <= classes ** (1.0 - gamma) * (1 + 1e-6))


def test_u_matches_the_papers_k100_bounds() -> None:
    uniform = torch.zeros(1, 100)
    for gamma, bound in ((0.1, 63.1), (0.2, 39.8), (0.3, 25.1), (0.4, 15.8), (0.5, 10.0)):  # wttm.md 1.3
        assert wttm_weight(uniform, gamma).item() == pytest.approx(bound, abs=0.05)


# ------------------------------------------------------------------------------------------- gradients


def test_no_gradient_reaches_the_teacher() -> None:
    student, teacher = random_logits(9)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for loss in (kd_loss(student, teacher, 4.0), ttm_loss(student, teacher, 0.3), wttm_loss(student, teacher, 0.3)):
        loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert not wttm_weight(teacher, 0.3).requires_grad


@pytest.mark.parametrize("gamma", [0.1, 0.4, 0.8])
def test_student_gradient_is_q_minus_p_hat(gamma: float) -> None:
    # Paper 3.1: d KL(p_hat || q) / d z_i = q_i - p_hat_i; the batch mean divides by B; WTTM scales by U_b.
    student64, teacher64 = (x.double() for x in random_logits(10, batch=6))
    student = student64.float().requires_grad_(True)
    teacher = teacher64.float()
    q = F.softmax(student64, dim=1)
    p_hat = F.softmax(gamma * teacher64, dim=1)
    _, u = official_ttm_parts(student64, teacher64, gamma)
    batch = student.shape[0]

    (grad_ttm,) = torch.autograd.grad(ttm_loss(student, teacher, gamma), student)
    torch.testing.assert_close(grad_ttm.double(), (q - p_hat) / batch, rtol=1e-4, atol=1e-7)
    (grad_wttm,) = torch.autograd.grad(wttm_loss(student, teacher, gamma), student)
    torch.testing.assert_close(grad_wttm.double(), u[:, None] * (q - p_hat) / batch, rtol=1e-4, atol=1e-7)


def test_kd_gradient_is_t_times_q_t_minus_p_t() -> None:
    # KD's gradient is (1/T)(q_T - p_T) per KL; the T^2 factor makes it T (q_T - p_T), divided by B.
    temperature = 4.0
    student64, teacher64 = (x.double() for x in random_logits(11, batch=6))
    student = student64.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(student, teacher64.float(), temperature), student)
    expected = temperature * (F.softmax(student64 / temperature, 1) - F.softmax(teacher64 / temperature, 1))
    torch.testing.assert_close(grad.double(), expected / student.shape[0], rtol=1e-4, atol=1e-7)


def test_gradient_is_finite_and_exact_for_large_gaps() -> None:
    gamma, gap = 0.1, 500.0
    student64, _ = (x.double() for x in random_logits(12, batch=4))
    teacher, winners = one_hot_like_teacher(4, 100, gap)
    student = student64.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(wttm_loss(student, teacher, gamma), student)
    _, u = closed_form_ttm(student64, winners, gap, gamma)
    p_hat = F.softmax(gamma * teacher.double(), dim=1)
    expected = u[:, None] * (F.softmax(student64, dim=1) - p_hat) / 4
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_run_in_float32_for_half_inputs(dtype: torch.dtype) -> None:
    student, teacher = random_logits(13)
    student_low, teacher_low = student.to(dtype), teacher.to(dtype)
    cases = (
        (kd_loss, 4.0),
        (ttm_loss, 0.2),
        (wttm_loss, 0.2),
    )
    for loss_fn, param in cases:
        low = loss_fn(student_low, teacher_low, param)
        assert low.dtype == torch.float32
        reference = loss_fn(student_low.float(), teacher_low.float(), param)
        assert low.item() == pytest.approx(reference.item(), rel=1e-6)
    assert wttm_weight(teacher_low, 0.2).dtype == torch.float32
    student_low.requires_grad_(True)
    wttm_loss(student_low, teacher_low, 0.2).backward()
    assert student_low.grad is not None and student_low.grad.dtype == dtype


def test_fp16_teacher_keeps_the_float32_weight() -> None:
    # wttm.md 8: K=100, one logit = gap, gamma 0.1: fp16 softmax-then-pow gives U = 1 at gap 20, fp64 gives 14.40.
    for gap, expected in ((10.0, 37.40), (20.0, 14.40), (30.0, 5.93)):
        teacher, _ = one_hot_like_teacher(1, 100, gap)
        assert wttm_weight(teacher.half(), 0.1).item() == pytest.approx(expected, abs=0.01)
    teacher, _ = one_hot_like_teacher(1, 100, 20.0)
    _, official_fp16_u = official_ttm_parts(torch.zeros(1, 100), teacher.half(), 0.1, dtype=torch.float16)
    assert official_fp16_u.item() == 1.0


def test_float64_inputs_stay_float64() -> None:
    student, teacher = (x.double() for x in random_logits(14))
    kl, u = official_ttm_parts(student, teacher, 0.3)
    out = wttm_loss(student, teacher, 0.3)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx((u * kl).mean().item(), rel=1e-12)
