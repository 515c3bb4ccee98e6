"""DIST, DKD, CRD and ITRD against independent small computations written differently (explicit loops over
samples, classes and feature dimensions in float64 with ``math``/numpy), plus their term wiring: DKD warm-up,
CRD negative sampling and memory updates, and where gradients go."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro.core.errors import ReproError
from repro.losses.crd import gathered_scores, nce_contrast_loss, sample_contrast_indices
from repro.losses.dist import dist_loss
from repro.losses.dkd import dkd_loss, dkd_parts
from repro.losses.itrd import itrd_correlation_loss, itrd_mutual_loss
from repro.losses.logit import kd_loss
from repro.data.batch import Batch
from repro.methods import Distiller, Outputs, TermContext, get_term

B, K, N, STUDENT_DIM, TEACHER_DIM = 4, 5, 10, 6, 7
TRAIN_LABELS = torch.arange(N) % K  # two samples per class, eight negatives per class


class TinyNet(nn.Module):
    """Stand-in model under the feature contract: features [hidden, pooled vector], then logits."""

    def __init__(self, in_dim: int, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(in_dim, width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        pre = self.body(x.flatten(1))
        feat = F.relu(pre)
        logits = self.fc(feat)
        if not is_feat:
            return logits
        return [pre if preact else feat, feat], logits


def make_ctx(student_dim: int = STUDENT_DIM, teacher_dim: int = TEACHER_DIM, train_labels=TRAIN_LABELS,
             student: nn.Module | None = None, teacher: nn.Module | None = None) -> TermContext:
    return TermContext(
        student=student or nn.Identity(), teacher=teacher or nn.Identity(), num_classes=K,
        train_labels=train_labels, device=torch.device("cpu"), epochs=30,
        student_feat_dims=[student_dim, student_dim], teacher_feat_dims=[teacher_dim, teacher_dim])


def make_batch(indices, epoch: int = 1) -> Batch:
    indices = torch.as_tensor(indices)
    labels = TRAIN_LABELS[indices]
    return Batch(images=torch.zeros(len(indices), 12), targets=labels, labels=labels, indices=indices, epoch=epoch)


def random_outputs(seed: int, student_dim: int = STUDENT_DIM, teacher_dim: int = TEACHER_DIM, batch: int = B
                   ) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, student_dim, generator=gen)
    teacher_feats = torch.randn(batch, teacher_dim, generator=gen)
    logits, teacher_logits = (torch.randn(batch, K, generator=gen) * 2 for _ in range(2))
    return Outputs(logits=logits, feats=[feats, feats], teacher_logits=teacher_logits,
                   teacher_feats=[teacher_feats, teacher_feats])


def softmax64(row) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------------- DIST


def reference_dist(student, teacher, beta: float, gamma: float, tau: float) -> float:
    y_s = np.stack([softmax64(r / tau) for r in student.double().numpy()])
    y_t = np.stack([softmax64(r / tau) for r in teacher.double().numpy()])
    inter = 1 - np.mean([np.corrcoef(y_s[b], y_t[b])[0, 1] for b in range(y_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0), (1.0, 3.0, 8.0)])
def test_dist_matches_pearson_loops(beta: float, gamma: float, tau: float) -> None:
    out = random_outputs(0)
    expected = reference_dist(out.logits, out.teacher_logits, beta, gamma, tau)
    assert dist_loss(out.logits, out.teacher_logits, beta, gamma, tau).item() == pytest.approx(expected, rel=1e-5)


def test_dist_term_defaults_and_perfect_match() -> None:
    term = get_term("dist")(make_ctx())
    assert (term.beta, term.gamma, term.tau) == (1.0, 1.0, 4.0)
    out = random_outputs(1)
    assert term(out, make_batch([0, 1, 2, 3])).item() == pytest.approx(
        reference_dist(out.logits, out.teacher_logits, 1.0, 1.0, 4.0), rel=1e-5)
    same = Outputs(logits=out.teacher_logits.clone(), teacher_logits=out.teacher_logits)
    assert term(same, make_batch([0, 1, 2, 3])).item() == pytest.approx(0.0, abs=1e-3)  # eps 1e-8, * tau^2


# ----------------------------------------------------------------------------------------------------- DKD


def reference_dkd_parts(student, teacher, labels, temperature: float) -> tuple[float, float]:
    """mdistiller's recipe with explicit per-sample loops: binary masses, then the non-target renormalisation."""
    tckd = nckd = 0.0
    for z, v, label in zip(student.double().numpy(), teacher.double().numpy(), labels.tolist()):
        p_s, p_t = softmax64(z / temperature), softmax64(v / temperature)
        binary_s, binary_t = (p_s[label], 1 - p_s[label]), (p_t[label], 1 - p_t[label])
        tckd += sum(t * math.log(t / s) for t, s in zip(binary_t, binary_s))
        others = [c for c in range(len(z)) if c != label]
        for c in others:
            t_c, s_c = p_t[c] / binary_t[1], p_s[c] / binary_s[1]
            nckd += t_c * math.log(t_c / s_c)
    scale = temperature**2 / len(labels)
    return tckd * scale, nckd * scale


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_loops(temperature: float) -> None:
    out = random_outputs(2)
    labels = TRAIN_LABELS[:B]
    tckd, nckd = reference_dkd_parts(out.logits, out.teacher_logits, labels, temperature)
    got_tckd, got_nckd = dkd_parts(out.logits, out.teacher_logits, labels, temperature)
    assert got_tckd.item() == pytest.approx(tckd, rel=1e-5)
    assert got_nckd.item() == pytest.approx(nckd, rel=1e-5)
    got = dkd_loss(out.logits, out.teacher_logits, labels, alpha=1.0, beta=8.0, temperature=temperature)
    assert got.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)


@pytest.mark.parametrize("gap", [3.0, 300.0])
def test_dkd_decomposes_kd(gap: float) -> None:
    # DKD paper Eq. 5, one sample: KD = TCKD + (1 - p^t_target) * NCKD, also where log(softmax mass) underflows.
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(1, K, generator=gen)
    teacher = torch.randn(1, K, generator=gen)
    label = torch.tensor([2])
    teacher[0, 2] += gap
    student[0, 4] += gap
    temperature = 4.0
    tckd, nckd = dkd_parts(student, teacher, label, temperature)
    teacher_other = 1 - F.softmax(teacher.double() / temperature, dim=1)[0, 2].item()
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    kd = kd_loss(student, teacher, temperature).item()
    assert tckd.item() + teacher_other * nckd.item() == pytest.approx(kd, rel=1e-4)


def test_dkd_warmup_scales_linearly_by_epoch() -> None:
    term = get_term("dkd")(make_ctx())
    assert (term.alpha, term.beta, term.temperature, term.warmup) == (1.0, 8.0, 4.0, 20)
    out = random_outputs(4)
    full = dkd_loss(out.logits, out.teacher_logits, TRAIN_LABELS[:B], 1.0, 8.0, 4.0).item()
    for epoch, factor in ((1, 0.05), (5, 0.25), (10, 0.5), (19, 0.95), (20, 1.0), (21, 1.0), (240, 1.0)):
        assert term(out, make_batch([0, 1, 2, 3], epoch=epoch)).item() == pytest.approx(factor * full, rel=1e-6)
    no_warmup = get_term("dkd")(make_ctx(), beta=6.0, warmup=0)
    six = dkd_loss(out.logits, out.teacher_logits, TRAIN_LABELS[:B], 1.0, 6.0, 4.0).item()
    assert no_warmup(out, make_batch([0, 1, 2, 3], epoch=1)).item() == pytest.approx(six, rel=1e-6)


# ----------------------------------------------------------------------------------------------------- CRD


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _unit(v) -> list[float]:
    norm = math.sqrt(_dot(v, v))
    return [x / norm for x in v]


def reference_embed(features: torch.Tensor, linear: nn.Linear) -> list[list[float]]:
    weight, bias = linear.weight.double().tolist(), linear.bias.double().tolist()
    rows = features.double().tolist()
    return [_unit([_dot(w, row) + b for w, b in zip(weight, bias)]) for row in rows]


def reference_nce_side(anchors, memory, contrast_idx, temperature: float, n_data: int, z: float | None):
    """One direction of CRD with loops: scores exp(<m_j, a_b>/T), Z = mean * N on first use, NCE loss."""
    scores = [[math.exp(_dot(memory[j], anchor) / temperature) for j in row]
              for anchor, row in zip(anchors, contrast_idx)]
    if z is None:
        z = sum(map(sum, scores)) / sum(map(len, scores)) * n_data
    k = len(contrast_idx[0]) - 1
    noise = k / n_data
    loss = 0.0
    for row in scores:
        positive, negatives = row[0] / z, [s / z for s in row[1:]]
        loss -= math.log(positive / (positive + noise + 1e-7))
        loss -= sum(math.log(noise / (p + noise + 1e-7)) for p in negatives)
    return loss / len(anchors), z


def crd_term_with_fixed_negatives(contrast_idx: torch.Tensor, **params):
    torch.manual_seed(0)
    term = get_term("crd")(make_ctx(), feat_dim=8, k=contrast_idx.shape[1] - 1, **params)
    term.contrast_indices = lambda indices: contrast_idx
    return term


def test_crd_matches_loops_and_updates_memory_with_momentum() -> None:
    gen = torch.Generator().manual_seed(5)
    batches = ([0, 3, 5, 9], [1, 3, 6, 8])
    contrast = [sample_contrast_indices(TRAIN_LABELS, torch.tensor(ix), 3, generator=gen) for ix in batches]
    term = crd_term_with_fixed_negatives(contrast[0])
    memory_s = term.memory.memory_student.double().tolist()
    memory_t = term.memory.memory_teacher.double().tolist()
    z_s = z_t = None
    for step, (indices, contrast_idx) in enumerate(zip(batches, contrast)):
        term.contrast_indices = lambda _, c=contrast_idx: c
        out = random_outputs(10 + step)
        emb_s = reference_embed(out.feats[-1], term.embed_student.linear)
        emb_t = reference_embed(out.teacher_feats[-1], term.embed_teacher.linear)
        idx = contrast_idx.tolist()
        loss_s, z_s = reference_nce_side(emb_s, memory_t, idx, 0.07, N, z_s)  # student anchor, teacher bank
        loss_t, z_t = reference_nce_side(emb_t, memory_s, idx, 0.07, N, z_t)
        got = term(out, make_batch(indices))
        assert got.item() == pytest.approx(loss_s + loss_t, rel=1e-4)
        assert term.memory.z_student.item() == pytest.approx(z_s, rel=1e-5)
        assert term.memory.z_teacher.item() == pytest.approx(z_t, rel=1e-5)
        for row, i in enumerate(indices):  # momentum 0.5, then L2-normalise
            memory_s[i] = _unit([0.5 * m + 0.5 * e for m, e in zip(memory_s[i], emb_s[row])])
            memory_t[i] = _unit([0.5 * m + 0.5 * e for m, e in zip(memory_t[i], emb_t[row])])
        torch.testing.assert_close(term.memory.memory_student.double(), torch.tensor(memory_s, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(term.memory.memory_teacher.double(), torch.tensor(memory_t, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


def test_crd_defaults_and_state() -> None:
    term = get_term("crd")(make_ctx())
    assert term.k == 16384 and term.mode == "exact"
    assert term.memory.temperature == 0.07 and term.memory.momentum == 0.5
    assert term.memory.memory_student.shape == (N, 128) and term.memory.memory_teacher.shape == (N, 128)
    assert term.embed_student.linear.in_features == STUDENT_DIM
    assert term.embed_teacher.linear.in_features == TEACHER_DIM
    state = term.state_dict()
    assert {"memory.memory_student", "memory.memory_teacher", "memory.z_student", "memory.z_teacher"} <= set(state)
    assert "train_labels" not in state
    assert term.features == "feat"


def test_nce_contrast_loss_single_row() -> None:
    probs = torch.tensor([[0.3, 0.1, 0.02]])
    noise = 2 / 10
    expected = -(math.log(0.3 / (0.3 + noise + 1e-7)) + math.log(noise / (0.1 + noise + 1e-7))
                 + math.log(noise / (0.02 + noise + 1e-7)))
    assert nce_contrast_loss(probs, 10).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_rows", [3, 50])  # both the one-matmul path (rows >= bank) and the gather path
def test_gathered_scores_match_loops(n_rows: int) -> None:
    gen = torch.Generator().manual_seed(6)
    memory = torch.randn(n_rows, 5, generator=gen)
    anchors = torch.randn(2, 5, generator=gen)
    idx = torch.randint(n_rows, (2, 4), generator=gen)
    got = gathered_scores(memory, idx, anchors)
    expected = [[_dot(memory[j].tolist(), anchors[b].tolist()) for j in idx[b].tolist()] for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [3, 8, 12])  # no replacement (k <= 8 negatives per class) and with replacement
def test_exact_negatives_never_share_the_positive_class(k: int) -> None:
    gen = torch.Generator().manual_seed(7)
    indices = torch.tensor([0, 3, 5, 9])
    seen = [set() for _ in indices]
    for _ in range(40):
        idx = sample_contrast_indices(TRAIN_LABELS, indices, k, generator=gen)
        assert idx.shape == (4, k + 1)
        assert torch.equal(idx[:, 0], indices)
        negative_labels = TRAIN_LABELS[idx[:, 1:]]
        assert torch.all(negative_labels != TRAIN_LABELS[indices][:, None])
        for row, negatives in enumerate(idx[:, 1:].tolist()):
            if k <= 8:
                assert len(set(negatives)) == k  # without replacement, as RepDistiller's np.random.choice
            seen[row].update(negatives)
    for row, i in enumerate(indices.tolist()):  # every other-class sample gets drawn
        assert seen[row] == {j for j in range(N) if TRAIN_LABELS[j] != TRAIN_LABELS[i]}


def test_relax_positive_is_same_class() -> None:
    gen = torch.Generator().manual_seed(8)
    indices = torch.tensor([0, 3, 5, 9])
    positives = set()
    for _ in range(30):
        idx = sample_contrast_indices(TRAIN_LABELS, indices, 3, mode="relax", generator=gen)
        assert torch.equal(TRAIN_LABELS[idx[:, 0]], TRAIN_LABELS[indices])
        assert torch.all(TRAIN_LABELS[idx[:, 1:]] != TRAIN_LABELS[indices][:, None])
        positives.update(idx[:, 0].tolist())
    assert positives - set(indices.tolist())  # not always the sample itself


def test_crd_bad_parameters_raise() -> None:
    with pytest.raises(ReproError, match="mode"):
        get_term("crd")(make_ctx(), mode="loose")
    with pytest.raises(ReproError, match="two classes"):
        get_term("crd")(make_ctx(train_labels=torch.zeros(N, dtype=torch.long)))
    with pytest.raises(ReproError, match="feature widths"):
        get_term("crd")(TermContext(student=nn.Identity(), teacher=nn.Identity(), num_classes=K,
                                    train_labels=TRAIN_LABELS, device=torch.device("cpu"), epochs=1))
    with pytest.raises(ReproError, match="unknown contrast mode"):
        sample_contrast_indices(TRAIN_LABELS, torch.tensor([0]), 3, mode="loose")


# ---------------------------------------------------------------------------------------------------- ITRD


def reference_correlation(student: list[list[float]], teacher: list[list[float]], alpha: float) -> float:
    n, total = len(student), 0.0
    for d in range(len(student[0])):
        s_col, t_col = [r[d] for r in student], [r[d] for r in teacher]
        s_mean, t_mean = sum(s_col) / n, sum(t_col) / n
        s_std = math.sqrt(sum((x - s_mean) ** 2 for x in s_col) / (n - 1))
        t_std = math.sqrt(sum((x - t_mean) ** 2 for x in t_col) / (n - 1))
        c = sum((s - s_mean) / s_std * (t - t_mean) / t_std for s, t in zip(s_col, t_col)) / n
        total += abs(1 - c) ** (2 * alpha)
    return math.log2(total)


def reference_mutual(student: list[list[float]], teacher: list[list[float]]) -> float:
    s_unit, t_unit = [_unit(r) for r in student], [_unit(r) for r in teacher]
    n = len(student)
    gram_s = [[_dot(s_unit[i], s_unit[j]) for j in range(n)] for i in range(n)]
    gram_st = [[gram_s[i][j] * _dot(t_unit[i], t_unit[j]) for j in range(n)] for i in range(n)]
    trace_s, trace_st = sum(gram_s[i][i] for i in range(n)), sum(gram_st[i][i] for i in range(n))
    return (sum((g / trace_s) ** 2 for row in gram_s for g in row)
            - sum((g / trace_st) ** 2 for row in gram_st for g in row))


def reference_linear(features: torch.Tensor, linear: nn.Linear) -> list[list[float]]:
    weight, bias = linear.weight.double().tolist(), linear.bias.double().tolist()
    return [[_dot(w, row) + b for w, b in zip(weight, bias)] for row in features.double().tolist()]


@pytest.mark.parametrize("alpha", [1.01, 1.5, 2.0])
def test_itrd_pure_losses_match_loops(alpha: float) -> None:
    out = random_outputs(20, student_dim=TEACHER_DIM)
    s, t = out.feats[-1], out.teacher_feats[-1]
    assert itrd_correlation_loss(s, t, alpha).item() == pytest.approx(
        reference_correlation(s.tolist(), t.tolist(), alpha), rel=1e-5, abs=1e-6)
    assert itrd_mutual_loss(s, t).item() == pytest.approx(reference_mutual(s.tolist(), t.tolist()), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("student_dim", [STUDENT_DIM, TEACHER_DIM])
def test_itrd_term_matches_loops(student_dim: int) -> None:
    torch.manual_seed(0)
    term = get_term("itrd")(make_ctx(student_dim=student_dim))
    assert (term.lambda_corr, term.lambda_mutual, term.alpha_it) == (2.0, 1.0, 1.5)
    assert term.features == "preact"
    out = random_outputs(21, student_dim=student_dim)
    embedded = reference_linear(out.feats[-1], term.embed)
    teacher = out.teacher_feats[-1].double().tolist()
    # The reference embeds the student for the mutual term only when the widths differ.
    mutual_input = embedded if student_dim != TEACHER_DIM else out.feats[-1].double().tolist()
    expected = 2.0 * reference_correlation(embedded, teacher, 1.5) + reference_mutual(mutual_input, teacher)
    assert term(out, make_batch([0, 1, 2, 3])).item() == pytest.approx(expected, rel=1e-4)

    no_mutual = get_term("itrd")(make_ctx(student_dim=student_dim), lambda_mutual=0.0, alpha_it=1.01)
    embedded = reference_linear(out.feats[-1], no_mutual.embed)
    assert no_mutual(out, make_batch([0, 1, 2, 3])).item() == pytest.approx(
        2.0 * reference_correlation(embedded, teacher, 1.01), rel=1e-4)


def test_itrd_dead_teacher_channel_stays_finite() -> None:
    out = random_outputs(22)
    out.teacher_feats[-1][:, 2] = 0.0  # a ReLU channel that is zero for the whole batch
    term = get_term("itrd")(make_ctx())
    assert torch.isfinite(term(out, make_batch([0, 1, 2, 3])))


# ------------------------------------------------------------------------------------ wiring and gradients


TERM_PARAMS = {"dist": {}, "dkd": {}, "crd": {"k": 3, "feat_dim": 8}, "itrd": {}}
HEADS = {"dist": False, "dkd": False, "crd": True, "itrd": True}  # feature terms: trainable heads, no logits


@pytest.mark.parametrize("name", sorted(TERM_PARAMS))
def test_gradients_reach_student_and_heads_not_teacher(name: str) -> None:
    torch.manual_seed(1)
    student, teacher = TinyNet(12, STUDENT_DIM, K), TinyNet(12, TEACHER_DIM, K)
    term = get_term(name)(make_ctx(student=student, teacher=teacher), **TERM_PARAMS[name])
    distiller = Distiller(student, teacher, {name: (1.0, term)})
    batch = make_batch([0, 3, 5, 9], epoch=5)
    batch.images = torch.randn(4, 12)
    _, losses = distiller.forward_train(batch)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.body.parameters())
    # Logit terms reach the classifier; feature terms read the pooled feature, which comes before it.
    assert all((p.grad is None) == HEADS[name] for p in student.fc.parameters())
    term_params = list(term.parameters())
    assert bool(term_params) == HEADS[name]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term_params)
    assert not any(p.requires_grad for p in term.buffers())


@pytest.mark.parametrize("name", sorted(TERM_PARAMS))
def test_terms_detach_teacher_outputs(name: str) -> None:
    # Even if a teacher output arrives with a graph (e.g. from a cache), no gradient may flow into it.
    term = get_term(name)(make_ctx(), **TERM_PARAMS[name])
    out = random_outputs(30)
    out.logits.requires_grad_(True)
    out.feats = [f.clone().requires_grad_(True) for f in out.feats]
    out.teacher_logits.requires_grad_(True)
    teacher_feat = out.teacher_feats[-1].requires_grad_(True)
    term(out, make_batch([0, 3, 5, 9], epoch=5)).backward()
    assert out.teacher_logits.grad is None and teacher_feat.grad is None


@pytest.mark.parametrize("name", sorted(TERM_PARAMS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_terms_compute_in_float32_under_half_inputs_and_autocast(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    term = get_term(name)(make_ctx(), **TERM_PARAMS[name])
    twin = copy.deepcopy(term)  # same heads, same memory: CRD's update changes the state
    out = random_outputs(31)
    low = Outputs(logits=out.logits.to(dtype), feats=[f.to(dtype) for f in out.feats],
                  teacher_logits=out.teacher_logits.to(dtype), teacher_feats=[f.to(dtype) for f in out.teacher_feats])
    upcast = Outputs(logits=low.logits.float(), feats=[f.float() for f in low.feats],
                     teacher_logits=low.teacher_logits.float(), teacher_feats=[f.float() for f in low.teacher_feats])
    batch = make_batch([0, 3, 5, 9], epoch=5)
    if name == "crd":
        fixed = sample_contrast_indices(TRAIN_LABELS, batch.indices, 3, generator=torch.Generator().manual_seed(3))
        term.contrast_indices = twin.contrast_indices = lambda _: fixed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = term(low, batch)
    expected = twin(upcast, batch)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
