"""FitNet, AT, VID, RKD and PKT (RepDistiller's CIFAR-100 feature baselines) against independent float64
computations written from the papers' formulas (explicit loops with ``math``/numpy), against values worked out by
hand from RepDistiller's ``distiller_zoo``, and wired through the Distiller and the training loop with real CIFAR
zoo models: connectors built from the probe forward's feature shapes, gradients reaching student and connectors,
never the teacher, and an exact resume."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from repro.train import distributed
from repro.core.errors import ReproError
from repro.losses.at import at_loss, at_pair_loss
from repro.losses.fitnet import ConvRegressor, hint_loss, regressor_conv
from repro.losses.pkt import pkt_loss
from repro.losses.rkd import pairwise_distances, rkd_loss
from repro.losses.vid import VIDRegressor, vid_nll
from repro.methods import Distiller, Outputs, TermContext, get_term
from repro.models import create_model
from repro.harness.spec import load_spec
from repro.harness.store import RunStore
from repro.train.loop import Trainer
from tests.support import tiny_kd_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURE_TERMS = ("fitnet", "at", "vid", "rkd", "pkt")
CONNECTORS = {"fitnet": True, "at": False, "vid": True, "rkd": False, "pkt": False}


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def avg_pool(fmap: np.ndarray, size: int) -> np.ndarray:
    """[C, H, W] -> [C, size, size] block means (H a multiple of size)."""
    c, h, _ = fmap.shape
    k = h // size
    return np.array([[[fmap[ch, i * k:(i + 1) * k, j * k:(j + 1) * k].mean() for j in range(size)]
                      for i in range(size)] for ch in range(c)])


# ------------------------------------------------------------------------------------------------- FitNet


def test_hint_loss_is_the_mean_squared_error() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    expected = sum((x - y) ** 2 for x, y in zip(f64(a).ravel(), f64(b).ravel())) / a.numel()
    assert hint_loss(a, b).item() == pytest.approx(expected, rel=1e-6)
    # By hand (nn.MSELoss on [[1, 2], [3, 4]] against zeros): (1 + 4 + 9 + 16) / 4 = 7.5
    assert hint_loss(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)).item() == 7.5


@pytest.mark.parametrize("student,teacher,kind", [
    ((32, 16, 16), (128, 16, 16), nn.Conv2d),  # resnet8x4 hint layer -> resnet32x4's: 1x1 convolution
    ((480, 8, 8), (128, 16, 16), nn.ConvTranspose2d),  # ShuffleV1 <- resnet32x4: upsampled
    ((64, 32, 32), (64, 16, 16), nn.Conv2d),  # twice as high: 3x3 stride 2
    ((16, 10, 10), (8, 8, 8), nn.Conv2d),  # larger by 2: a valid 3x3 convolution
])
def test_regressor_maps_student_maps_onto_the_teacher_shape(student, teacher, kind) -> None:
    conv = regressor_conv(student, teacher)
    assert type(conv) is kind
    regressor = ConvRegressor(student, teacher).eval()
    assert regressor(torch.randn(2, *student)).shape == (2, *teacher)
    if student[1] == teacher[1]:
        assert conv.kernel_size == (1, 1)


def test_regressor_refuses_a_student_map_it_cannot_map() -> None:
    with pytest.raises(ReproError, match="no convolutional regressor maps a student map of 4x4 onto a teacher map of 16x16"):
        regressor_conv((8, 4, 4), (8, 16, 16))
    with pytest.raises(ReproError, match="needs feature maps"):
        regressor_conv((8,), (8, 4, 4))


def test_fitnet_term_is_relu_bn_conv_then_mse_and_checks_its_layer() -> None:
    shapes_s, shapes_t = [(4, 8, 8), (4, 8, 8), (6, 4, 4), (6,)], [(4, 8, 8), (5, 8, 8), (3, 4, 4), (3,)]
    term = get_term("fitnet")(shape_ctx(shapes_s, shapes_t)).eval()
    conv, bn = term.regressor.conv, term.regressor.bn
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    out = outputs_with([torch.randn(2, *s, generator=gen) for s in shapes_s],
                       [torch.randn(2, *s, generator=gen) for s in shapes_t])
    # Reference: the 1x1 convolution, BatchNorm in eval mode and ReLU written as per-position loops.
    x, w, b = f64(out.feats[2]), f64(conv.weight)[:, :, 0, 0], f64(conv.bias)
    mean, var, gamma, beta = (f64(t) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    target, total = f64(out.teacher_feats[2]), 0.0
    for n, c, i, j in itertools.product(range(2), range(3), range(4), range(4)):
        pre = sum(w[c, k] * x[n, k, i, j] for k in range(6)) + b[c]
        y = max(0.0, (pre - mean[c]) / math.sqrt(var[c] + bn.eps) * gamma[c] + beta[c])
        total += (y - target[n, c, i, j]) ** 2
    assert term(out, None).item() == pytest.approx(total / (2 * 3 * 4 * 4), rel=1e-5)
    with pytest.raises(ReproError, match="hint_layer 4 is out of range"):
        get_term("fitnet")(shape_ctx(shapes_s, shapes_t), hint_layer=4)
    with pytest.raises(ReproError, match="feature shapes"):
        get_term("fitnet")(shape_ctx([], []))


# ----------------------------------------------------------------------------------------------------- AT


def reference_at_pair(student: np.ndarray, teacher: np.ndarray, p: float) -> float:
    """Zagoruyko & Komodakis Eq. 2 with the normalised map Q = vec(sum_c |A_c|^p) / ||.||_2, squared and averaged
    over samples and positions (RepDistiller's reduction); the larger map is block-averaged first."""
    size = min(student.shape[2], teacher.shape[2])
    total, count = 0.0, 0
    for s_map, t_map in zip(student, teacher):
        qs = [sum(abs(v) ** p for v in col) for col in avg_pool(s_map, size).reshape(s_map.shape[0], -1).T]
        qt = [sum(abs(v) ** p for v in col) for col in avg_pool(t_map, size).reshape(t_map.shape[0], -1).T]
        ns, nt = math.sqrt(sum(q * q for q in qs)), math.sqrt(sum(q * q for q in qt))
        total += sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt))
        count += len(qs)
    return total / count


@pytest.mark.parametrize("s_size,t_size", [(4, 4), (8, 4), (4, 8)])
def test_at_matches_the_paper_formula_with_pooling(s_size: int, t_size: int) -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 5, s_size, s_size, generator=gen)
    teacher = torch.randn(3, 7, t_size, t_size, generator=gen)
    expected = reference_at_pair(f64(student), f64(teacher), 2.0)
    assert at_pair_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)
    relu = torch.relu  # p = 4 on post-activation maps (|A|^p = A^p there)
    expected4 = reference_at_pair(f64(relu(student)), f64(relu(teacher)), 4.0)
    assert at_pair_loss(relu(student), relu(teacher), 4.0).item() == pytest.approx(expected4, rel=1e-5)


def test_at_by_hand_and_summed_over_pairs() -> None:
    # One sample, one channel, a 1x2 map: Q_s = [1, 0], Q_t = [0, 1]: ((1 - 0)^2 + (0 - 1)^2) / 2 = 1
    s, t = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    assert at_pair_loss(s, t).item() == pytest.approx(1.0)
    # [2, 2] against [1, 1]: both normalise to [1/sqrt2, 1/sqrt2] (AT ignores scale): 0
    assert at_pair_loss(torch.full((1, 1, 1, 2), 2.0), torch.ones(1, 1, 1, 2)).item() == pytest.approx(0.0, abs=1e-7)
    gen = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)) for _ in range(3)]
    whole = at_loss([s for s, _ in pairs], [t for _, t in pairs] + [torch.zeros(2, 1, 4, 4)])  # zip: extra ignored
    assert whole.item() == pytest.approx(sum(at_pair_loss(s, t).item() for s, t in pairs), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- VID


def reference_vid(regressor: VIDRegressor, student: np.ndarray, teacher: np.ndarray) -> float:
    """Ahn et al. Eq. 5 (Gaussian, heteroscedastic per channel, constant dropped), mean over every element, with
    the 1x1 convolutions as explicit channel sums and var = log(1 + exp(alpha)) + eps."""
    w = [f64(m.weight)[:, :, 0, 0] for m in regressor.regressor if isinstance(m, nn.Conv2d)]
    log_scale = f64(regressor.log_scale)
    var = [math.log(1 + math.exp(a)) + regressor.eps for a in log_scale]
    size = min(student.shape[2], teacher.shape[2])
    total, count = 0.0, 0
    for s_map, t_map in zip(student, teacher):
        s_map, t_map = avg_pool(s_map, size), avg_pool(t_map, size)
        for i, j in itertools.product(range(size), range(size)):
            h = s_map[:, i, j]
            for layer, weight in enumerate(w):
                h = [sum(weight[o, k] * h[k] for k in range(len(h))) for o in range(weight.shape[0])]
                h = [max(0.0, v) for v in h] if layer < 2 else h
            for c, mu in enumerate(h):
                total += 0.5 * ((mu - t_map[c, i, j]) ** 2 / var[c] + math.log(var[c]))
                count += 1
    return total / count


@pytest.mark.parametrize("s_size,t_size", [(4, 4), (8, 4), (2, 4)])
def test_vid_matches_the_gaussian_likelihood(s_size: int, t_size: int) -> None:
    torch.manual_seed(4)
    regressor = VIDRegressor(3, 5, 5)
    with torch.no_grad():
        regressor.log_scale.normal_()
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, s_size, s_size, generator=gen)
    teacher = torch.randn(2, 5, t_size, t_size, generator=gen)
    expected = reference_vid(regressor, f64(student), f64(teacher))
    assert regressor(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_vid_starts_at_the_initial_variance_and_by_hand() -> None:
    regressor = VIDRegressor(2, 3, 3)
    assert torch.allclose(regressor.variance().double(), torch.full((3,), 5.0, dtype=torch.float64), atol=1e-5)
    # A perfect mean leaves 0.5 * log(var) per element: 0.5 * log 5 at the start (RepDistiller init_pred_var 5).
    target = torch.randn(2, 3, 4, 4)
    got = vid_nll(target, torch.full((3,), 5.0), target)
    assert got.item() == pytest.approx(0.5 * math.log(5.0), rel=1e-6)
    # Mean 0 against a target of 1 with var 2: 0.5 * (1/2 + log 2)
    assert vid_nll(torch.zeros(1, 1, 1, 1), torch.tensor([2.0]), torch.ones(1, 1, 1, 1)).item() == \
        pytest.approx(0.5 * (0.5 + math.log(2.0)), rel=1e-6)


def test_vid_term_has_one_regressor_per_middle_pair() -> None:
    shapes_s = [(4, 8, 8), (4, 8, 8), (6, 4, 4), (8, 2, 2), (8,)]
    shapes_t = [(4, 8, 8), (5, 8, 8), (7, 8, 8), (9,)]  # fewer features: zip pairs two
    term = get_term("vid")(shape_ctx(shapes_s, shapes_t))
    assert len(term.pairs) == 2
    first = [m for m in term.pairs[0].regressor if isinstance(m, nn.Conv2d)]
    assert [tuple(m.weight.shape[:2]) for m in first] == [(5, 4), (5, 5), (5, 5)]
    assert all(m.bias is None for m in first)
    gen = torch.Generator().manual_seed(5)
    out = outputs_with([torch.randn(2, *s, generator=gen) for s in shapes_s],
                       [torch.randn(2, *s, generator=gen) for s in shapes_t])
    expected = sum(reference_vid(pair, f64(s), f64(t))
                   for pair, s, t in zip(term.pairs, out.feats[1:-1], out.teacher_feats[1:-1]))
    assert term(out, None).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ReproError, match="init_pred_var"):
        get_term("vid")(shape_ctx(shapes_s, shapes_t), init_pred_var=1e-6)


# ---------------------------------------------------------------------------------------------------- RKD


def reference_rkd(student: np.ndarray, teacher: np.ndarray, w_d: float, w_a: float) -> float:
    """Park et al. Eqs. 3-7: distances over distinct pairs normalised by their mean, cosines of the angle at e_i of
    every triplet (0 where a difference vector is zero), Huber (delta 1) averaged over the B^2 and B^3 entries."""
    n = len(student)

    def distances(e: np.ndarray) -> list[list[float]]:
        d = [[math.dist(e[i], e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def cosine(e: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = e[j] - e[i], e[k] - e[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(np.dot(u, v) / (nu * nv))

    ds, dt = distances(student), distances(teacher)
    loss_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    loss_a = sum(huber(cosine(student, i, j, k) - cosine(teacher, i, j, k))
                 for i, j, k in itertools.product(range(n), repeat=3)) / n**3
    return w_d * loss_d + w_a * loss_a


@pytest.mark.parametrize("w_d,w_a,scale", [(25.0, 50.0, 1.0), (1.0, 0.0, 3.0), (0.0, 1.0, 0.2)])
def test_rkd_matches_distance_and_angle_loops(w_d: float, w_a: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(5, 4, generator=gen) * scale, torch.randn(5, 7, generator=gen)
    expected = reference_rkd(f64(student), f64(teacher), w_d, w_a)
    assert rkd_loss(student, teacher, w_d, w_a).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_by_hand_and_invariances() -> None:
    # Three points on a line at 0, 1, 3 (student) against an equilateral-free layout 0, 2, 3 (teacher).
    s, t = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.0], [2.0], [3.0]])
    # Distances s: 1, 3, 2 (mean 2) -> 0.5, 1.5, 1; t: 2, 3, 1 (mean 2) -> 1, 1.5, 0.5. Differences of the six
    # off-diagonal entries: -0.5, 0, 0.5 twice each -> Huber 0.125 four times: 0.5 / 9 entries.
    # Angles on a line are +-1: from the middle point the two others lie on opposite sides in both layouts, so
    # every cosine agrees and the angle term is 0.
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(0.5 / 9, rel=1e-6)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    # RKD compares relations only: a scaled, shifted and rotated copy of the teacher costs nothing.
    gen = torch.Generator().manual_seed(7)
    teacher = torch.randn(6, 3, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    student = 2.5 * teacher @ rotation + 1.0
    assert rkd_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-4)
    d = pairwise_distances(teacher)
    assert torch.all(d.diagonal() == 0) and torch.allclose(d, torch.cdist(teacher, teacher), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- PKT


def reference_pkt(student: np.ndarray, teacher: np.ndarray, eps: float = 1e-7) -> float:
    """Passalis & Tefas Eqs. 9-10 with the cosine kernel (K + 1) / 2, conditional probabilities per row, KL with
    eps inside the ratio, averaged over all B^2 entries (RepDistiller's torch.mean)."""
    def probs(e: np.ndarray) -> list[list[float]]:
        unit = [row / (math.sqrt(sum(v * v for v in row)) + eps) for row in e]
        k = [[(float(np.dot(a, b)) + 1) / 2 for b in unit] for a in unit]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(student), probs(teacher)
    n = len(student)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_matches_the_conditional_probability_kl() -> None:
    gen = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(6, 4, generator=gen), torch.randn(6, 9, generator=gen)
    assert pkt_loss(student, teacher).item() == pytest.approx(reference_pkt(f64(student), f64(teacher)), rel=1e-5)


def test_pkt_by_hand() -> None:
    # Student e1, e2: kernel [[1, .5], [.5, 1]] -> rows [2/3, 1/3], [1/3, 2/3]; teacher e1, e1: all 1/2.
    # mean of t log(t / s) = (1/4) * 2 * (0.5 log(0.75) + 0.5 log(1.5)) = log(1.125) / 4
    student, teacher = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(student, teacher).item() == pytest.approx(math.log(1.125) / 4, rel=1e-5)
    assert pkt_loss(teacher * 3, teacher).item() == pytest.approx(0.0, abs=1e-7)  # cosines ignore the scale
    assert torch.isfinite(pkt_loss(torch.zeros(3, 4), torch.randn(3, 4)))  # a dead feature stays finite


# ------------------------------------------------------------------------------------------ terms and wiring


def shape_ctx(student_shapes, teacher_shapes, student: nn.Module | None = None,
              teacher: nn.Module | None = None) -> TermContext:
    return TermContext(student=student or nn.Identity(), teacher=teacher or nn.Identity(), num_classes=10,
                       train_labels=torch.arange(8) % 2, device=torch.device("cpu"), epochs=2,
                       student_feat_dims=[s[0] for s in student_shapes],
                       teacher_feat_dims=[s[0] for s in teacher_shapes],
                       student_feat_shapes=list(student_shapes), teacher_feat_shapes=list(teacher_shapes))


def outputs_with(feats, teacher_feats) -> Outputs:
    return Outputs(logits=torch.zeros(len(feats[0]), 10), feats=feats, teacher_logits=torch.zeros(len(feats[0]), 10),
                   teacher_feats=teacher_feats)


def probe(model: nn.Module) -> list[tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        feats, _ = model(torch.zeros(2, 3, 32, 32), is_feat=True)
    return [tuple(f.shape[1:]) for f in feats]


def spec_pairs() -> list[tuple[str, str]]:
    pairs = set()
    for spec_id in ("wttm/cifar100-table1", "wttm/cifar100-table3"):
        spec = load_spec(spec_id)
        pairs |= {(c.teacher, c.student) for c in spec.cells if c.method in ("FitNet", "VID") and c.teacher}
    return sorted(pairs)


def test_every_table_pair_builds_each_term_and_gives_a_finite_loss() -> None:
    pairs = spec_pairs()
    assert len(pairs) == 13  # Table 1's seven same-architecture pairs, Table 3's six others
    shapes = {}
    for arch in sorted({a for pair in pairs for a in pair}):
        torch.manual_seed(0)
        shapes[arch] = probe(create_model(arch, num_classes=100))
    gen = torch.Generator().manual_seed(9)
    for teacher, student in pairs:
        ctx = shape_ctx(shapes[student], shapes[teacher])
        out = outputs_with([torch.rand(3, *s, generator=gen) for s in shapes[student]],
                           [torch.rand(3, *s, generator=gen) for s in shapes[teacher]])
        for name in FEATURE_TERMS:
            term = get_term(name)(ctx)
            loss = term(out, None)
            assert loss.dim() == 0 and torch.isfinite(loss), (name, teacher, student)


@pytest.mark.parametrize("name", FEATURE_TERMS)
def test_one_step_through_the_distiller_reaches_student_and_connectors(name: str) -> None:
    torch.manual_seed(10)
    teacher = create_model("resnet8x4", num_classes=10).eval()
    student = create_model("resnet8", num_classes=10)
    term = get_term(name)(shape_ctx(probe(student), probe(teacher), student, teacher))
    student.train()
    distiller = Distiller(student, teacher, {"ce": (1.0, get_term("ce")(shape_ctx([], []))), name: (1.0, term)})
    distiller.train()
    batch = _image_batch()
    before = copy.deepcopy(list(term.parameters()))
    _, losses = distiller.forward_train(batch)
    assert torch.isfinite(losses[name]) and losses[name].item() > 0
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.terms.parameters()], lr=0.05)
    losses[name].backward()
    assert all(p.grad is None for p in teacher.parameters())
    body = [p for n, p in student.named_parameters() if not n.startswith("fc.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body)
    assert all(p.grad is None for p in student.fc.parameters())  # feature terms stop before the classifier
    params = list(term.parameters())
    assert bool(params) == CONNECTORS[name]
    assert all(p.grad is not None for p in params)
    # Every connector parameter learns but the regressor's conv bias: just before a BatchNorm in training mode, its
    # gradient is zero in exact arithmetic.
    learning = [i for i, (n, _) in enumerate(term.named_parameters()) if not n.endswith("conv.bias")]
    optimizer.step()
    assert all(not torch.equal(before[i], params[i]) for i in learning)


def _image_batch():
    from repro.data.batch import Batch

    gen = torch.Generator().manual_seed(11)
    labels = torch.arange(8) % 10
    return Batch(images=torch.randn(8, 3, 32, 32, generator=gen), targets=labels, labels=labels,
                 indices=torch.arange(8), epoch=1)


# ------------------------------------------------------------------------------------ the training loop


def _trainer(workdirs: dict, losses: dict, run_id: str = "fitnet-run") -> Trainer:
    return tiny_kd_trainer(workdirs["runs"], run_id, losses)


def test_the_training_loop_probes_feature_shapes_for_the_connectors(workdirs) -> None:
    trainer = _trainer(workdirs, {"ce": {"weight": 1.0}, "fitnet": {"weight": 100.0}, "vid": {"weight": 1.0}})
    trainer._build()
    fitnet, vid = trainer.distiller.terms["fitnet"], trainer.distiller.terms["vid"]
    s_shapes, t_shapes = probe(copy.deepcopy(trainer.student)), probe(copy.deepcopy(trainer.resolved.teacher))
    assert tuple(fitnet.regressor.bn.weight.shape) == (t_shapes[2][0],)
    assert len(vid.pairs) == min(len(s_shapes), len(t_shapes)) - 2
    # The connectors are optimised with the student (one SGD parameter list, as RepDistiller's trainable_list).
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in [*fitnet.parameters(), *vid.parameters()])


def test_a_fitnet_run_resumed_after_an_interruption_matches_the_uninterrupted_run(workdirs, monkeypatch) -> None:
    losses = {"ce": {"weight": 1.0}, "fitnet": {"weight": 100.0}}
    clean = _trainer(workdirs, losses, "clean")
    expected = clean.run()
    original = Trainer._train_epoch

    class Interrupted(Exception):
        pass

    def stop_at_epoch_2(self, epoch, bar):
        if epoch == 2:
            raise Interrupted  # after epoch 1's checkpoint, as a kill between epochs
        return original(self, epoch, bar)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_train_epoch", stop_at_epoch_2)
        with pytest.raises(Interrupted):
            _trainer(workdirs, losses, "resumed").run()
    resumed = _trainer(workdirs, losses, "resumed")
    got = resumed.run()
    assert got["best_top1"] == expected["best_top1"] and got["last_top1"] == expected["last_top1"]
    store = RunStore(workdirs["runs"])
    a = torch.load(store.model_path("clean"), weights_only=True)
    b = torch.load(store.model_path("resumed"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The regressor (weights and BatchNorm statistics) resumed from the checkpoint, not from a fresh init.
    for (name, x), (_, y) in zip(clean.distiller.terms.state_dict().items(),
                                 resumed.distiller.terms.state_dict().items()):
        assert torch.equal(x, y), name
    assert distributed.stateful_terms(resumed.distiller.terms) == ["fitnet"]  # its BN statistics are state
