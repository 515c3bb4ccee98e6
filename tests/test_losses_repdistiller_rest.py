"""SP, CC, AB, FT, FSP and NST against independent float64 computations written from each paper's formula
(explicit loops over samples, channels and positions with ``math``), against values worked out by hand from
RepDistiller's ``distiller_zoo`` on tiny inputs, and their terms wired to real CIFAR zoo models: which features
they read, where gradients go, and what their initialisation stages train."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from repro.core.errors import ReproError
from repro.losses.ab import ab_loss, connector
from repro.losses.cc import correlation_congruence_loss
from repro.losses.fsp import fsp_loss
from repro.losses.ft import factor_transfer_loss
from repro.losses.nst import nst_loss
from repro.losses.sp import similarity_preserving_loss
from repro.data.batch import Batch
from repro.methods import Distiller, TermContext, get_term
from repro.methods.base import forward_model
from repro.models import create_model
from repro.train.loop import student_feature_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pool(x: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a [c, h, h] array to [c, size, size] (h a multiple of size), by explicit blocks."""
    c, h, _ = x.shape
    k = h // size
    return np.array([[[x[ch, i * k:(i + 1) * k, j * k:(j + 1) * k].mean() for j in range(size)]
                      for i in range(size)] for ch in range(c)])


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


# ------------------------------------------------------------------------------------------------------- SP
def sp_reference(fs: np.ndarray, ft: np.ndarray) -> float:
    """Tung & Mori Eq. 2-4: G = A A^T, each row divided by its L2 norm, ||G_t - G_s||_F^2 / b^2."""
    b = fs.shape[0]

    def gram(f: np.ndarray) -> list[list[float]]:
        rows = [f[i].ravel().tolist() for i in range(b)]
        g = [[sum(x * y for x, y in zip(rows[i], rows[j])) for j in range(b)] for i in range(b)]
        return [_unit(r) for r in g]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def test_sp_matches_the_formula_and_a_hand_value():
    fs, ft = _rand(0, 5, 3, 4, 4), _rand(1, 5, 7, 2, 2)
    ours = similarity_preserving_loss(fs, ft)
    assert float(ours) == pytest.approx(sp_reference(fs.double().numpy(), ft.double().numpy()), rel=1e-5)
    # By hand from distiller_zoo/SP.py: G_s = I (rows stay), G_t = all 2s -> rows (1/sqrt2, 1/sqrt2);
    # sum of squared differences 2 (1/sqrt2 - 1)^2 + 2 (1/2) = 4 - 2 sqrt2, over b^2 = 4.
    hand = (4 - 2 * math.sqrt(2)) / 4
    value = similarity_preserving_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 2))
    assert float(value) == pytest.approx(hand, rel=1e-6)


# ------------------------------------------------------------------------------------------------------- CC
def test_cc_matches_the_formula_and_a_hand_value():
    s, t = _rand(2, 6, 5), _rand(3, 6, 5)
    sd, td = s.double().numpy(), t.double().numpy()
    reference = sum(sum(abs(sd[i, d] - td[i, d]) * abs(sd[i + 1, d] - td[i + 1, d]) for d in range(5))
                    for i in range(5)) / 5
    assert float(correlation_congruence_loss(s, t)) == pytest.approx(reference, rel=1e-5)
    # By hand from distiller_zoo/CC.py: delta rows (1,2), (3,4), (0,0): pair products 3 + 8 = 11 and 0; mean 5.5.
    value = correlation_congruence_loss(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]]), torch.zeros(3, 2))
    assert float(value) == pytest.approx(5.5)


# ------------------------------------------------------------------------------------------------------ NST
def nst_reference(fs: np.ndarray, ft: np.ndarray) -> float:
    """Huang & Wang Eq. 6 with k(x, y) = (x^T y)^2: per sample, MMD^2 between the L2-normalised channel maps
    (the larger map average-pooled to the smaller first), averaged over the batch."""
    total = 0.0
    for s, t in zip(fs, ft):
        size = min(s.shape[1], t.shape[1])
        s, t = _pool(s, size), _pool(t, size)
        S = [_unit(ch.ravel().tolist()) for ch in s]
        T = [_unit(ch.ravel().tolist()) for ch in t]
        k = lambda a, b: sum(x * y for x, y in zip(a, b)) ** 2  # noqa: E731
        tt = sum(k(a, b) for a in T for b in T) / len(T) ** 2
        ss = sum(k(a, b) for a in S for b in S) / len(S) ** 2
        st = sum(k(a, b) for a in S for b in T) / (len(S) * len(T))
        total += tt + ss - 2 * st
    return total / len(fs)


def test_nst_matches_the_formula_and_a_hand_value():
    fs, ft = _rand(4, 3, 4, 4, 4), _rand(5, 3, 6, 2, 2)  # different channels; the student is pooled to 2x2
    ours = nst_loss(fs, ft)
    assert float(ours) == pytest.approx(nst_reference(fs.double().numpy(), ft.double().numpy()), rel=1e-5)
    # By hand from distiller_zoo/NST.py: student one channel (1, 0); teacher channels (1, 0), (0, 1):
    # mean k_tt = 2/4, k_ss = 1, mean k_st = 1/2 -> 0.5 + 1 - 1 = 0.5.
    value = nst_loss(torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]]))
    assert float(value) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------ FSP
def fsp_reference(gs: list[np.ndarray], gt: list[np.ndarray]) -> float:
    """Yim et al. Eq. 1-2: G_ij = sum_xy F1_i F2_j / (h w) per sample of consecutive maps (pooled to the smaller
    size), then the mean squared difference over samples and matrix entries, summed over pairs."""
    def matrix(bottom: np.ndarray, top: np.ndarray) -> np.ndarray:
        size = min(bottom.shape[1], top.shape[1])
        bottom, top = _pool(bottom, size), _pool(top, size)
        return np.array([[sum(bottom[i].ravel()[p] * top[j].ravel()[p] for p in range(size * size)) / size ** 2
                          for j in range(top.shape[0])] for i in range(bottom.shape[0])])

    total = 0.0
    for k in range(len(gs) - 1):
        diffs = [matrix(gs[k][b], gs[k + 1][b]) - matrix(gt[k][b], gt[k + 1][b]) for b in range(gs[0].shape[0])]
        total += float(np.mean(np.square(np.stack(diffs))))
    return total


def test_fsp_matches_the_formula_and_a_hand_value():
    shapes = [(2, 3, 4, 4), (2, 5, 4, 4), (2, 4, 2, 2)]
    gs = [_rand(10 + i, *s) for i, s in enumerate(shapes)]
    gt = [_rand(20 + i, *s) for i, s in enumerate(shapes)]
    ours = fsp_loss(gs, gt)
    reference = fsp_reference([g.double().numpy() for g in gs], [g.double().numpy() for g in gt])
    assert float(ours) == pytest.approx(reference, rel=1e-5)
    # By hand from distiller_zoo/FSP.py: bottom (1, 2), top (3, 4) over a 1x2 map: (3 + 8) / 2 = 5.5; the
    # teacher's bottom is zero, so its matrix is 0 and the loss 5.5^2.
    value = fsp_loss([torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[3.0, 4.0]]]])],
                     [torch.zeros(1, 1, 1, 2), torch.tensor([[[[3.0, 4.0]]]])])
    assert float(value) == pytest.approx(30.25)


# ------------------------------------------------------------------------------------------------------- AB
def ab_reference(sources: list[np.ndarray], targets: list[np.ndarray], margin: float) -> float:
    """Heo et al. Eq. 6 (the alternative squared hinge) per element, RepDistiller's stage weights 2^(i-n+1),
    divided by the batch size and scaled by 3/1000."""
    n, total = len(sources), 0.0
    for i, (s, t) in enumerate(zip(sources, targets)):
        stage = 0.0
        for a, b in zip(s.ravel(), t.ravel()):
            if a > -margin and b <= 0:
                stage += (a + margin) ** 2
            if a <= margin and b > 0:
                stage += (a - margin) ** 2
        total += 2.0 ** (i - n + 1) * stage / s.shape[0] * 3 / 1000
    return total


def test_ab_matches_the_formula_and_a_hand_value():
    sources = [_rand(30, 3, 2, 4, 4), _rand(31, 3, 4, 2, 2)]
    targets = [_rand(32, 3, 2, 4, 4), _rand(33, 3, 4, 2, 2)]
    for margin in (1.0, 0.5):
        ours = ab_loss(sources, targets, margin)
        reference = ab_reference([s.double().numpy() for s in sources], [t.double().numpy() for t in targets],
                                 margin)
        assert float(ours) == pytest.approx(reference, rel=1e-5)
    # By hand from distiller_zoo/AB.py (one stage, weight 1, batch 1, margin 1): source 0.5 over a negative
    # target adds 1.5^2; -2 adds nothing; 0.2 over a positive target adds 0.8^2; 3 adds nothing; 0.3 over a zero
    # target (t <= 0: the negative side) adds 1.3^2: (2.25 + 0.64 + 1.69) * 3/1000.
    value = ab_loss([torch.tensor([[0.5, -2.0, 0.2, 3.0, 0.3]])], [torch.tensor([[-1.0, -1.0, 1.0, 1.0, 0.0]])])
    assert float(value) == pytest.approx(4.58 * 3 / 1000)


def test_ab_connectors_map_every_student_stage_to_the_teachers_shape():
    for s_shape, t_shape in [((16, 32, 32), (16, 32, 32)), ((16, 32, 32), (32, 32, 32)),
                             ((240, 16, 16), (16, 32, 32)), ((64, 32, 32), (128, 16, 16)), ((8, 6, 6), (4, 4, 4))]:
        out = connector(s_shape, t_shape).eval()(torch.zeros(2, *s_shape))
        assert tuple(out.shape[1:]) == t_shape
    assert isinstance(connector((16, 32, 32), (16, 32, 32)), nn.Identity)
    with pytest.raises(ReproError, match="regressor"):
        connector((16, 4, 4), (16, 16, 16))


# ------------------------------------------------------------------------------------------------------- FT
def test_ft_matches_the_formula_and_a_hand_value():
    fs, ft = _rand(40, 3, 4, 4, 4), _rand(41, 3, 2, 2, 2)
    sd, td = fs.double().numpy(), ft.double().numpy()
    total = 0.0
    for s, t in zip(sd, td):
        s = _pool(s, 2)
        phi_s = _unit([sum(s[c].ravel()[p] ** 2 for c in range(4)) / 4 for p in range(4)])
        phi_t = _unit([sum(t[c].ravel()[p] ** 2 for c in range(2)) / 2 for p in range(4)])
        total += sum(abs(a - b) for a, b in zip(phi_s, phi_t)) / 4
    assert float(factor_transfer_loss(fs, ft)) == pytest.approx(total / 3, rel=1e-5)
    # By hand from distiller_zoo/FT.py: student channels (1, 0), (1, 2) -> channel means of squares (1, 2),
    # normalised (1, 2)/sqrt5; teacher (3, 0) -> (1, 0); mean |difference| = (1 - 1/sqrt5 + 2/sqrt5) / 2.
    value = factor_transfer_loss(torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]]), torch.tensor([[[[3.0, 0.0]]]]))
    assert float(value) == pytest.approx((1 + 1 / math.sqrt(5)) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------- terms on real models
def _ctx(student: nn.Module, teacher: nn.Module) -> TermContext:
    probe = torch.zeros(2, 3, 32, 32)
    ctx = TermContext(student=student, teacher=teacher, num_classes=10, train_labels=torch.arange(8) % 10,
                      device=torch.device("cpu"), epochs=4)
    for model, prefix in ((student, "student"), (teacher, "teacher")):
        model.eval()
        with torch.no_grad():
            feats, _ = model(probe, is_feat=True)
        setattr(ctx, f"{prefix}_feat_dims", [int(f.shape[1]) for f in feats])
        setattr(ctx, f"{prefix}_feat_shapes", [tuple(f.shape[1:]) for f in feats])
        model.train()
    return ctx


def _batch(n: int = 4) -> Batch:
    labels = torch.arange(n) % 10
    return Batch(images=_rand(50, n, 3, 32, 32), targets=labels, labels=labels, indices=torch.arange(n), epoch=1)


PAIRS = [("resnet8", "resnet14"), ("ShuffleV1", "wrn_16_2")]  # same shapes; other widths and spatial sizes


def _models(student_arch: str, teacher_arch: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return create_model(student_arch, num_classes=10), create_model(teacher_arch, num_classes=10)


def _grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("student_arch,teacher_arch", PAIRS)
@pytest.mark.parametrize("name,trained_parts", [("sp", []), ("nst", []), ("cc", ["embed_student", "embed_teacher"]),
                                                 ("ft", ["translator"])])
def test_training_terms_step_through_the_distiller(name, trained_parts, student_arch, teacher_arch):
    student, teacher = _models(student_arch, teacher_arch)
    term = get_term(name)(_ctx(student, teacher))
    distiller = Distiller(student, teacher, {"ce": (1.0, get_term("ce")(_ctx(student, teacher))), name: (2.0, term)})
    distiller.train()
    _, losses = distiller.forward_train(_batch())
    assert set(losses) == {"ce", name} and torch.isfinite(losses[name]) and float(losses[name]) > 0
    losses[name].backward()  # the term alone: its gradient reaches the student's layers and its own modules
    assert _grad_norm(student) > 0
    assert all(p.grad is None for p in teacher.parameters())
    for part in trained_parts:
        assert _grad_norm(getattr(term, part)) > 0
    optimised = {id(p) for m in term.trainable_modules() for p in m.parameters()}
    assert optimised == {id(p) for part in trained_parts for p in getattr(term, part).parameters()}
    if name == "ft":  # the paraphraser is frozen after its stage: no gradient, in eval mode, not optimised
        assert _grad_norm(term.paraphraser) == 0 and not term.paraphraser.training


@pytest.mark.parametrize("student_arch,teacher_arch", PAIRS)
@pytest.mark.parametrize("name", ["ab", "fsp", "ft"])
def test_init_stage_losses_train_what_the_stage_declares(name, student_arch, teacher_arch):
    student, teacher = _models(student_arch, teacher_arch)
    ctx = _ctx(student, teacher)
    if name == "fsp" and student_arch != "resnet8":
        with pytest.raises(ReproError, match="equal channel counts"):
            get_term(name)(ctx)
        return
    term = get_term(name)(ctx)
    stage = term.init_stage()
    assert stage.epochs == 30 and stage.lr is None  # RepDistiller --init_epochs 30 at opt.learning_rate
    preact = term.features == "preact"
    from repro.methods import Outputs

    batch = _batch()
    logits, feats = forward_model(student, batch.images, True, preact)
    with torch.no_grad():
        t_logits, t_feats = forward_model(teacher, batch.images, True, preact)
    loss = term.init_loss(Outputs(logits, feats, t_logits, t_feats), batch)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert (_grad_norm(student) > 0) == stage.trains_student == (name != "ft")
    assert _grad_norm(student.get_classifier()) == 0
    stage_params = [p for m in stage.modules for p in m.parameters()]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in stage_params)
    assert bool(stage_params) == (name == "ft" or student_arch != "resnet8")  # equal shapes: identity connectors
    assert term.active(1) == (name == "ft")  # AB and FSP add no loss after their stage (RepDistiller loss_kd = 0)


def test_ab_reads_pre_activation_features():
    assert get_term("ab").features == "preact"
    assert {get_term(n).features for n in ("sp", "cc", "nst", "ft", "fsp")} == {"feat"}


def test_student_feature_modules_leave_out_the_classifier():
    for arch in ("resnet8", "wrn_16_2", "vgg8", "ShuffleV1", "MobileNetV2"):
        model = create_model(arch, num_classes=10)
        kept = {id(p) for m in student_feature_modules(model) for p in m.parameters()}
        classifier = {id(p) for p in model.get_classifier().parameters()}
        assert kept == {id(p) for p in model.parameters()} - classifier
    with pytest.raises(ReproError, match="get_classifier"):
        student_feature_modules(nn.Sequential(nn.Linear(2, 2)))


def test_fsp_compares_each_pair_of_consecutive_stages():
    # FSP over n maps has n - 1 terms: changing only the first stage of the teacher changes only the first term.
    gs = [_rand(60 + i, 1, 2, 2, 2) for i in range(3)]
    gt = [g.clone() for g in gs]
    assert float(fsp_loss(gs, gt)) == 0.0
    gt[2] = gt[2] + 1
    only_last = float(fsp_loss(gs, gt))
    first = float(fsp_loss(gs[:2], gt[:2]))
    assert first == 0.0 and only_last > 0
