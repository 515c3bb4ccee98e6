"""ReviewKD, SRRL and KD++ (WTTM Table 5's ImageNet feature baselines): each loss against an independent
float64 computation written from the paper's formula (explicit loops with numpy), values worked out by hand
from the official code's definitions, and each registered term training one step through the Distiller with
small torchvision/timm models, gradients reaching the student and the term's own modules."""
from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch
import torch.nn as nn

from repro.core.errors import ReproError
from repro.losses.logit import kd_loss
from repro.losses.nd import EmbeddingProjector, class_means, nd_loss
from repro.losses.reviewkd import AttentionFusion, build_fusions, hcl_loss, review_features
from repro.losses.srrl import SRRLConnector, feature_mean_loss, softmax_regression_loss
from repro.data.batch import Batch
from repro.methods import Distiller, Outputs, TermContext, get_term
from repro.methods.base import forward_model
from repro.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def pooled64(x: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of [B, C, H, W] to size x size for H, W divisible by size, by explicit blocks."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, size, size))
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * h // size:(i + 1) * h // size, j * w // size:(j + 1) * w // size].mean(
                axis=(2, 3))
    return out


def reference_hcl(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """ReviewKD paper Sec. 3.3: per level, MSE plus MSEs of 4x4 / 2x2 / 1x1 pooled maps smaller than the map,
    weighted 1/2, 1/4, 1/8, normalised by the weights' sum."""
    total = 0.0
    for fs, ft in pairs:
        terms = [(1.0, np.mean((fs - ft) ** 2))]
        weight = 1.0
        for size in (4, 2, 1):
            if size < fs.shape[2]:
                weight /= 2
                terms.append((weight, np.mean((pooled64(fs, size) - pooled64(ft, size)) ** 2)))
        total += sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    return total


def test_hcl_matches_float64_pyramid() -> None:
    gen = np.random.default_rng(0)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1)]
    pairs = [(gen.normal(size=s), gen.normal(size=s)) for s in shapes]
    got = hcl_loss([torch.tensor(a) for a, _ in pairs], [torch.tensor(b) for _, b in pairs])
    assert got.item() == pytest.approx(reference_hcl(pairs), rel=1e-6)


def test_hcl_hand_values() -> None:
    # One 2x2 map [[1, 2], [3, 4]] against zeros: MSE 30/4 = 7.5; only the 1x1 level (< 2) applies, its mean
    # 2.5 gives 6.25 at weight 1/2: (7.5 + 3.125) / 1.5 = 7.083333...
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hcl_loss([fs], [torch.zeros_like(fs)]).item() == pytest.approx(10.625 / 1.5)
    # A 1x1 map (the pooled vector) is a plain MSE: ((1-0)^2 + (3-1)^2) / 2 = 2.5.
    assert hcl_loss([torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)],
                    [torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)]).item() == pytest.approx(2.5)


def conv1x1_64(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    out = np.einsum("bchw,oc->bohw", x, weight[:, :, 0, 0])
    return out if bias is None else out + bias[None, :, None, None]


def conv3x3_64(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, weight.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = np.einsum("bckl,ockl->bo", padded[:, :, i:i + 3, j:j + 3], weight)
    return out


def bn_eval64(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    scale = bn.weight.detach().double().numpy() / np.sqrt(var + bn.eps)
    return (x - mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias.detach().double().numpy()[
        None, :, None, None]


def reference_abf(fusion: AttentionFusion, x: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ABF in eval mode, from the paper's Fig. 3: reduce, nearest-upsample the residual, two sigmoid maps from
    the concatenation, weighted sum, then the 3x3 conv + BN."""
    reduced = bn_eval64(conv1x1_64(x, fusion.reduce[0].weight.detach().double().numpy()), fusion.reduce[1])
    h, w = reduced.shape[-2:]
    rh, rw = residual.shape[-2:]
    up = residual[:, :, (np.arange(h) * rh) // h][:, :, :, (np.arange(w) * rw) // w]
    att = fusion.attention[0]
    logits = conv1x1_64(np.concatenate([reduced, up], axis=1), att.weight.detach().double().numpy(),
                        att.bias.detach().double().numpy())
    maps = 1 / (1 + np.exp(-logits))
    fused = reduced * maps[:, 0:1] + up * maps[:, 1:2]
    return bn_eval64(conv3x3_64(fused, fusion.expand[0].weight.detach().double().numpy()), fusion.expand[1]), fused


def test_attention_fusion_matches_float64_reference() -> None:
    torch.manual_seed(0)
    fusion = AttentionFusion(3, 4, 5, fuse=True).double()
    for bn in (fusion.reduce[1], fusion.expand[1]):  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    fusion.eval()
    x, residual = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    out, fused = fusion(x, residual)
    ref_out, ref_fused = reference_abf(fusion, x.numpy(), residual.numpy())
    np.testing.assert_allclose(fused.detach().numpy(), ref_fused, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=1e-10, atol=1e-12)


def test_review_order_widths_and_residual_chain() -> None:
    torch.manual_seed(1)
    fusions = build_fusions([3, 4, 6], [5, 7, 9], mid_channels=4)
    assert fusions[0].attention is None and all(f.attention is not None for f in fusions[1:])  # deepest: no fuse
    feats = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 6, 1, 1)]
    outs = review_features(fusions, feats)
    assert [tuple(o.shape) for o in outs] == [(2, 5, 4, 4), (2, 7, 2, 2), (2, 9, 1, 1)]
    # The shallowest output depends on the deepest feature through the residual chain.
    feats[2].requires_grad_(True)
    review_features(fusions, feats)[0].sum().backward()
    assert feats[2].grad is not None and feats[2].grad.abs().sum() > 0
    # mdistiller's OUT_SHAPES: a level is resized to the teacher's map before the 3x3 conv.
    assert tuple(review_features(fusions, feats, [(8, 8), (2, 2), (1, 1)])[0].shape) == (2, 5, 8, 8)


# ---------------------------------------------------------------------------------------------------- SRRL


def test_srrl_losses_match_float64_loops() -> None:
    gen = np.random.default_rng(2)
    s, t = gen.normal(size=(3, 4, 2, 2)), gen.normal(size=(3, 4, 2, 2))
    expected_fm = np.mean([[(s[b, c].mean() - t[b, c].mean()) ** 2 for c in range(4)] for b in range(3)])
    assert feature_mean_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected_fm, rel=1e-6)
    head = nn.Linear(4, 6).double()
    teacher_logits = gen.normal(size=(3, 6))
    w, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    expected_sr = np.mean([(w @ s[b].mean(axis=(1, 2)) + bias - teacher_logits[b]) ** 2 for b in range(3)])
    got = softmax_regression_loss(torch.tensor(s), head, torch.tensor(teacher_logits))
    assert got.item() == pytest.approx(expected_sr, rel=1e-6)


def test_srrl_regression_hand_value_and_frozen_head() -> None:
    # A 1x1 map (2, 1) through head y = 2 x0 - x1 + 1 gives 1 against a teacher logit of 4: (1 - 4)^2 = 9.
    head = nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, -1.0]]))
        head.bias.fill_(1.0)
    student = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1).requires_grad_(True)
    loss = softmax_regression_loss(student, head, torch.tensor([[4.0]]))
    assert loss.item() == pytest.approx(9.0)
    loss.backward()
    assert head.weight.grad is None  # the teacher's classifier gets no gradient
    assert student.grad.flatten().tolist() == pytest.approx([2 * (1 - 4) * 2, 2 * (1 - 4) * -1])


def test_srrl_connector_init() -> None:
    torch.manual_seed(3)
    conn = SRRLConnector(64, 512)
    assert conn.conv.bias is None and conn.bn.weight.eq(1).all() and conn.bn.bias.eq(0).all()
    assert conn.conv.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)


# ------------------------------------------------------------------------------------------------------ ND


def test_nd_loss_matches_float64_loop_and_hand_value() -> None:
    gen = np.random.default_rng(4)
    s, t, centers = gen.normal(size=(5, 3)), gen.normal(size=(5, 3)), gen.normal(size=(4, 3))
    labels = np.array([0, 3, 1, 3, 2])
    expected = np.mean([1 - s[i] @ (centers[y] / np.linalg.norm(centers[y]))
                        / max(np.linalg.norm(s[i]), np.linalg.norm(t[i])) for i, y in enumerate(labels)])
    got = nd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(centers), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # s = (3, 4), ||t|| = 10 > ||s|| = 5, class mean (7, 0): 1 - 3 / 10 = 0.7.
    hand = nd_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 10.0]]), torch.tensor([[7.0, 0.0]]),
                   torch.tensor([0]))
    assert hand.item() == pytest.approx(0.7)


def test_class_means_over_batches() -> None:
    gen = np.random.default_rng(5)
    emb, labels = gen.normal(size=(9, 2)), np.array([0, 2, 2, 0, 0, 2, 2, 2, 0])
    pairs = [(torch.tensor(emb[:4]), torch.tensor(labels[:4])), (torch.tensor(emb[4:]), torch.tensor(labels[4:]))]
    means, counts = class_means(pairs, num_classes=3)
    assert counts.tolist() == [4, 0, 5]
    np.testing.assert_allclose(means[0].numpy(), emb[labels == 0].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(means[2].numpy(), emb[labels == 2].mean(axis=0), rtol=1e-12)
    assert means[1].abs().sum() == 0
    with pytest.raises(ReproError, match="no training batch"):
        class_means([], num_classes=3)


def test_embedding_projector_init() -> None:
    torch.manual_seed(6)
    proj = EmbeddingProjector(1024, 2048)
    assert proj.net[2].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert proj.net[1].p == 0.5


# ---------------------------------------------------------------------------- terms through the Distiller

CLASSES, SIZE = 10, 32


def small_model(arch: str) -> nn.Module:
    torch.manual_seed(7)
    return create_model(arch, num_classes=CLASSES)


def probe_dims(model: nn.Module) -> list[int]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, feats = forward_model(model, torch.zeros(2, 3, SIZE, SIZE), True, False)
    model.train(was_training)
    return [int(f.shape[1]) for f in feats]


def image_batches(count: int, size: int = 4, epoch: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(8)
    out = []
    for i in range(count):
        labels = torch.randint(0, CLASSES, (size,), generator=gen)
        out.append(Batch(images=torch.randn(size, 3, SIZE, SIZE, generator=gen), targets=labels, labels=labels,
                         indices=torch.arange(i * size, (i + 1) * size), epoch=epoch))
    return out


def make_context(student: nn.Module, teacher: nn.Module) -> TermContext:
    batches = image_batches(2)
    return TermContext(student=student, teacher=teacher, num_classes=CLASSES,
                       train_labels=torch.cat([b.labels for b in batches]), device=torch.device("cpu"), epochs=10,
                       image_size=SIZE, student_feat_dims=probe_dims(student), teacher_feat_dims=probe_dims(teacher),
                       sample_batches=lambda n: iter(batches[:int(min(n, len(batches)))]))


TERMS = [("reviewkd", {}), ("reviewkd", {"mid_channels": 8}), ("srrl", {}), ("kdpp", {"kd_weight": 2.5})]


@pytest.mark.parametrize("student_arch", ["tv_resnet18", "mobilenet_v1"])
@pytest.mark.parametrize("name,params", TERMS)
def test_term_trains_a_step_through_the_distiller(name: str, params: dict, student_arch: str) -> None:
    student, teacher = small_model(student_arch), small_model("tv_resnet18").eval()
    term = get_term(name)(make_context(student, teacher), **params)
    distiller = Distiller(student, teacher, {"ce": (1.0, get_term("ce")(make_context(student, teacher))),
                                             name: (1.0, term)})
    distiller.train()
    batch = image_batches(1, epoch=3)[0]
    _, losses = distiller.forward_train(batch)
    assert torch.isfinite(losses[name]) and losses[name].item() > 0
    sum(losses.values()).backward()
    first_student_grad = next(p for p in student.parameters()).grad
    assert first_student_grad is not None and first_student_grad.abs().sum() > 0
    own = [p for p in term.parameters()]
    if name != "kdpp" or student_arch == "mobilenet_v1":  # KD++ has a projector only when widths differ
        assert own and all(p.grad is not None for p in own if p.requires_grad)
        assert sum(p.grad.abs().sum() for p in own if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher.parameters())  # nothing flows into the teacher
    torch.optim.SGD([*student.parameters(), *term.parameters()], lr=0.01).step()


def test_reviewkd_levels_and_widths() -> None:
    student, teacher = small_model("mobilenet_v1"), small_model("tv_resnet18")
    term = get_term("reviewkd")(make_context(student, teacher), mid_channels=256)
    # Deepest first: the pooled 1024 -> 512, then the 1024/512/256/128-channel stages to layer4..layer1.
    widths = [(f.reduce[0].in_channels, f.reduce[0].out_channels, f.expand[0].out_channels) for f in term.fusions]
    assert widths == [(1024, 256, 512), (1024, 256, 512), (512, 256, 256), (256, 256, 128), (128, 256, 64)]
    default = get_term("reviewkd")(make_context(small_model("tv_resnet18"), teacher))
    assert default.fusions[0].reduce[0].out_channels == 512  # mdistiller's min(512, last width)
    assert default.warmup_factor(1) == 1.0


def test_reviewkd_loss_is_hcl_of_the_fused_student_levels() -> None:
    student, teacher = small_model("tv_resnet18"), small_model("tv_resnet18").eval()
    term = get_term("reviewkd")(make_context(student, teacher)).eval()
    batch = image_batches(1)[0]
    _, feats = forward_model(student, batch.images, True, True)
    t_logits, t_feats = forward_model(teacher, batch.images, True, True)
    got = term(Outputs(logits=t_logits, feats=feats, teacher_logits=t_logits, teacher_feats=t_feats), batch)
    levels_s = [*feats[1:5], feats[5][:, :, None, None]]  # layer1..layer4 pre-activation, then the pooled vector
    levels_t = [*t_feats[1:5], t_feats[5][:, :, None, None]]
    assert got.item() == pytest.approx(hcl_loss(review_features(term.fusions, levels_s), levels_t).item(), rel=1e-6)


def test_srrl_uses_the_teachers_classifier() -> None:
    student, teacher = small_model("mobilenet_v1"), small_model("tv_resnet18").eval()
    term = get_term("srrl")(make_context(student, teacher))
    assert term.teacher_head is teacher.fc and "teacher_head" not in dict(term.named_modules())
    assert (term.connector.conv.in_channels, term.connector.conv.out_channels) == (1024, 512)
    with pytest.raises(ReproError, match="get_classifier"):
        get_term("srrl")(dataclasses.replace(make_context(student, teacher), teacher=nn.Sequential(teacher)))


def test_kdpp_class_centers_warmup_and_value() -> None:
    student, teacher = small_model("tv_resnet18"), small_model("tv_resnet18").eval()
    ctx = make_context(student, teacher)
    term = get_term("kdpp")(ctx, kd_weight=2.5, nd_weight=1.0, warmup=5)
    batches = image_batches(2)
    with torch.no_grad():
        embs = [forward_model(teacher, b.images, True, False)[1][-1] for b in batches]
    labels = torch.cat([b.labels for b in batches])
    expected_centers = torch.stack([torch.cat(embs)[labels == k].mean(0) if (labels == k).any()
                                    else torch.zeros(embs[0].shape[1]) for k in range(CLASSES)])
    torch.testing.assert_close(term.class_centers, expected_centers, rtol=1e-5, atol=1e-6)
    assert term.report()["class_centers"]["images"] == 8 and term.projector is None
    assert [term.kd_factor(e) for e in (1, 2, 6, 7)] == [0.0, 0.2, 1.0, 1.0]  # official 0-based epoch / 5
    batch = image_batches(1, epoch=3)[0]
    _, feats = forward_model(student, batch.images, True, False)
    t_logits, t_feats = forward_model(teacher, batch.images, True, False)
    got = term(Outputs(logits=feats[-1] @ torch.ones(512, CLASSES), feats=feats, teacher_logits=t_logits,
                       teacher_feats=t_feats), batch)
    logits = feats[-1] @ torch.ones(512, CLASSES)
    expected = (2.5 * 0.4 * kd_loss(logits, t_logits, 1.0)
                + nd_loss(feats[-1], t_feats[-1], expected_centers, batch.labels))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kdpp_center_pass_keeps_rng_and_teacher_mode() -> None:
    student, teacher = small_model("tv_resnet18"), small_model("tv_resnet18").train()
    ctx = make_context(student, teacher)
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    term = get_term("kdpp")(ctx, center_batches=1)
    assert torch.equal(torch.rand(3), expected_draw)  # the pass over training batches moved no random state
    assert teacher.training  # restored after the eval-mode pass
    assert term.report()["class_centers"] == {"images": 4, "classes_seen": int(ctx.train_labels[:4].unique().numel()),
                                              "batches": 1}


@pytest.mark.parametrize("arch", ["tv_resnet18", "mobilenet_v1"])
def test_get_classifier_is_the_head_behind_the_logits(arch: str) -> None:
    model = small_model(arch).eval()
    with torch.no_grad():
        feats, logits = model(torch.randn(2, 3, SIZE, SIZE), is_feat=True)
        torch.testing.assert_close(model.get_classifier()(feats[-1]), logits)
