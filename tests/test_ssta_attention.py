"""Attention capture against timm's own (non-fused) attention, the ssta_attn / deit_hard terms and the
label-free masked_recon term."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from repro.core.errors import ReproError
from repro.data.batch import Batch
from repro.methods import Distiller, Outputs, TermContext, get_term
from repro.models import create_model
from repro.methods.attention_readings import AttentionCapture, attention_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_attention_probs(model, layer, images):
    """Attention weights as timm computes them on its non-fused path (input of attn_drop)."""
    attn = model.vit.blocks[layer].attn
    recorded = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: recorded.setdefault("p", i[0].detach()))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        attn.fused_attn = True
        handle.remove()
    return recorded["p"], logits


def _ctx(student, teacher=None, assistants=None, classes=5):
    return TermContext(student=student, teacher=teacher, num_classes=classes, train_labels=torch.zeros(8).long(),
                       device=torch.device("cpu"), epochs=4, assistants=assistants or {})


def _batch(images, epoch=1, classes=5):
    labels = torch.arange(images.shape[0]) % classes
    return Batch(images=images, targets=labels, labels=labels, indices=torch.arange(images.shape[0]), epoch=epoch)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_capture_equals_timm_non_fused_attention(images):
    torch.manual_seed(0)
    model = create_model("vit_smoke_tiny", num_classes=5).eval()
    assert model.vit.blocks[1].attn.fused_attn  # the production path keeps timm's fused attention
    capture = AttentionCapture(model, layer=1, heads=[0, 2])
    with torch.no_grad():
        fused_logits = model(images)
    log_maps = capture.pop()
    reference, plain_logits = _timm_attention_probs(model, 1, images)
    assert log_maps.dtype == torch.float32 and log_maps.shape == (2, 2, 65, 65)
    torch.testing.assert_close(log_maps.exp(), reference[:, [0, 2]], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-4, atol=1e-5)


def test_relation_mean_and_temperature_modes(images):
    torch.manual_seed(1)
    model = create_model("vit_smoke_tiny", num_classes=5).eval()
    attn = model.vit.blocks[-1].attn
    qkv_out = {}
    attn.qkv.register_forward_hook(lambda m, i, o: qkv_out.setdefault("x", o.detach()))
    captures = {mode: AttentionCapture(model, -1, None, mode, temperature=2.0) for mode in ("heads", "relation", "mean")}
    with torch.no_grad():
        model(images)
    q, k, _ = qkv_out["x"].reshape(2, 65, 3, 3, 32).permute(2, 0, 3, 1, 4)
    heads = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(32) / 2.0, dim=-1)
    torch.testing.assert_close(captures["heads"].pop().exp(), heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(captures["mean"].pop().exp(), heads.mean(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    q_cat, k_cat = q.transpose(1, 2).reshape(2, 65, 96), k.transpose(1, 2).reshape(2, 65, 96)
    relation = torch.softmax(q_cat @ k_cat.transpose(-2, -1) / math.sqrt(96) / 2.0, dim=-1)
    torch.testing.assert_close(captures["relation"].pop().exp()[:, 0], relation, rtol=1e-4, atol=1e-6)


def test_dist_token_is_dropped_and_rows_renormalised(images):
    torch.manual_seed(2)
    model = create_model("vit_smoke_tiny_distilled", num_classes=5).eval()
    capture = AttentionCapture(model, layer=0, heads=[1])
    with torch.no_grad():
        model(images)
    log_maps = capture.pop()
    assert log_maps.shape == (2, 1, 65, 65)  # 66 tokens (cls, dist, 64 patches) minus the dist token
    torch.testing.assert_close(log_maps.exp().sum(dim=-1), torch.ones(2, 1, 65))
    full, _ = _timm_attention_probs(model, 0, images)
    keep = [0] + list(range(2, 66))
    kept = full[:, 1:2][:, :, keep][:, :, :, keep]
    torch.testing.assert_close(log_maps.exp(), kept / kept.sum(dim=-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_student_maps_carry_gradients_to_qkv(images):
    torch.manual_seed(3)
    model = create_model("vit_smoke_tiny", num_classes=5).train()
    capture = AttentionCapture(model, layer=-1, heads=[0], training_only=True)
    model(images)
    student = capture.pop()
    target = torch.log_softmax(torch.randn_like(student), dim=-1)
    attention_kl(target, student).backward()
    qkv = model.vit.blocks[-1].attn.qkv.weight.grad
    dim = 96
    assert qkv[0:32].abs().sum() > 0  # q of head 0
    assert qkv[32:64].abs().sum() == 0  # q of head 1 is not part of the map
    assert qkv[dim:dim + 32].abs().sum() > 0  # k of head 0
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(images)
    assert capture.maps is None  # student captures skip eval forwards


def test_attention_kl_properties():
    log_p = torch.log_softmax(torch.randn(2, 1, 5, 5), dim=-1)
    log_q = torch.log_softmax(torch.randn(2, 1, 5, 5), dim=-1)
    assert attention_kl(log_p, log_p).abs() < 1e-6
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(attention_kl(log_p, log_q), expected)
    with pytest.raises(ReproError, match="differ in shape"):
        attention_kl(log_p, log_q[:, :, :4, :4])


def test_capture_rejects_bad_heads_and_layers():
    model = create_model("vit_smoke_tiny", num_classes=5)
    with pytest.raises(ReproError, match="head indices"):
        AttentionCapture(model, -1, [3])
    with pytest.raises(ReproError, match="out of range"):
        AttentionCapture(model, 4, [0])
    with pytest.raises(ReproError, match="mode"):
        AttentionCapture(model, -1, [0], mode="sum")


# ------------------------------------------------------------------------------------------------ ssta_attn

def _forward_counter(model):
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def test_ssta_attn_term_through_the_distiller(images):
    torch.manual_seed(4)
    student = create_model("vit_smoke_tiny_distilled", num_classes=5)
    teacher = create_model("vit_smoke_small", num_classes=5)
    ta = create_model("vit_smoke_tiny", num_classes=0)
    teacher_calls, ta_calls = _forward_counter(teacher), _forward_counter(ta)
    ctx = _ctx(student, teacher, {"ta": ta})
    term = get_term("ssta_attn")(ctx, beta=1.0, lam=0.5, teacher_head=4, ta_head=2, student_heads=[0, 1],
                                 stop_epoch=2)
    assert not list(term.parameters())  # teacher and TA stay outside the term's module tree
    distiller = Distiller(student, None, {"ce": (1.0, get_term("ce")(ctx)), "ssta_attn": (1.0, term)})
    distiller.train()
    _, losses = distiller.forward_train(_batch(images, epoch=2))
    assert set(losses) == {"ce", "ssta_attn"} and torch.isfinite(losses["ssta_attn"]) and losses["ssta_attn"] > 0
    assert len(teacher_calls) == 1 and len(ta_calls) == 1
    losses["ssta_attn"].backward()
    qkv_grad = student.vit.blocks[-1].attn.qkv.weight.grad
    assert qkv_grad[0:64].abs().sum() > 0 and qkv_grad[64:96].abs().sum() == 0  # split: heads 0, 1 only
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in ta.parameters())

    # the loss is beta*KL(teacher head 4 || student head 0) + lam*KL(TA head 2 || student head 1)
    student.eval()
    caps = [AttentionCapture(student, -1, [0, 1]), AttentionCapture(teacher, -1, [4]), AttentionCapture(ta, -1, [2])]
    with torch.no_grad():
        student(images), teacher(images), ta(images)
        s, t, a = (c.pop() for c in caps)
        expected = attention_kl(t, s[:, :1]) + 0.5 * attention_kl(a, s[:, 1:])
        student.train()
        _, again = distiller.forward_train(_batch(images, epoch=1))
    torch.testing.assert_close(again["ssta_attn"], expected, rtol=1e-4, atol=1e-6)

    # early stop: from epoch stop_epoch + 1 on, no term, no teacher or TA forward
    before = (len(teacher_calls), len(ta_calls))
    _, late = distiller.forward_train(_batch(images, epoch=3))
    assert set(late) == {"ce"} and (len(teacher_calls), len(ta_calls)) == before
    assert term._student_capture.maps is None


@pytest.mark.parametrize("mapping", ["relation", "mean"])
def test_ssta_attn_single_map_mappings(images, mapping):
    torch.manual_seed(5)
    student = create_model("vit_smoke_tiny", num_classes=5).train()
    teacher = create_model("vit_smoke_small", num_classes=5)
    term = get_term("ssta_attn")(_ctx(student, teacher), beta=1.0, lam=0.0, mapping=mapping, teacher_head=1)
    assert term.active(1)
    logits = student(images)
    loss = term(Outputs(logits=logits), _batch(images))
    loss.backward()
    assert torch.isfinite(loss) and student.vit.blocks[-1].attn.qkv.weight.grad[64:96].abs().sum() > 0


def test_ta_only_split_uses_the_second_student_head(images):
    torch.manual_seed(8)
    student = create_model("vit_smoke_tiny", num_classes=5).train()
    ta = create_model("vit_smoke_tiny", num_classes=0)
    term = get_term("ssta_attn")(_ctx(student, None, {"ta": ta}), beta=0.0, lam=1.0, student_heads=[0, 2],
                                 ta_head=0)
    term.active(1)
    term(Outputs(logits=student(images)), _batch(images)).backward()
    q_grad = student.vit.blocks[-1].attn.qkv.weight.grad[:96]
    assert q_grad[64:96].abs().sum() > 0 and q_grad[:64].abs().sum() == 0


def test_selection_params_pin_the_chosen_heads():
    from repro.methods.ssta import selection_params
    from repro.methods.head_importance import HeadSelection

    params = selection_params(HeadSelection("importance", [(11, 4)]), HeadSelection("fixed", [(9, 0)]))
    assert params == {"teacher_layer": 11, "teacher_head": 4, "ta_layer": 9, "ta_head": 0}
    with pytest.raises(ReproError, match="not one"):
        selection_params(HeadSelection("all", [(11, 0), (11, 1)]))


def test_ssta_attn_parameter_errors():
    student = create_model("vit_smoke_tiny", num_classes=5)
    teacher = create_model("vit_smoke_tiny", num_classes=5)
    term_cls = get_term("ssta_attn")
    with pytest.raises(ReproError, match="auto"):
        term_cls(_ctx(student, teacher, {"ta": teacher}), teacher_head="auto")
    with pytest.raises(ReproError, match="assistant 'ta'"):
        term_cls(_ctx(student, teacher))
    with pytest.raises(ReproError, match="mapping"):
        term_cls(_ctx(student, teacher, {"ta": teacher}), mapping="concat")
    with pytest.raises(ReproError, match="both 0"):
        term_cls(_ctx(student, teacher, {"ta": teacher}), beta=0, lam=0)


def test_deit_hard_uses_dist_head_and_teacher_argmax(images):
    torch.manual_seed(6)
    student = create_model("vit_smoke_tiny_distilled", num_classes=5)
    teacher = create_model("vit_smoke_tiny", num_classes=5)
    ctx = _ctx(student, teacher)
    terms = {"ce": (0.5, get_term("ce")(ctx)), "deit_hard": (0.5, get_term("deit_hard")(ctx))}
    distiller = Distiller(student, teacher, terms).train()
    batch = _batch(images)
    logits, losses = distiller.forward_train(batch)
    feats, _ = student(images, is_feat=True)
    cls_logits = student.vit.head(feats[-2][:, 0])
    dist_logits = student.vit.head_dist(feats[-2][:, 1])
    with torch.no_grad():
        teacher_labels = teacher.eval()(images).argmax(dim=1)
    torch.testing.assert_close(logits, cls_logits)
    torch.testing.assert_close(losses["deit_hard"], 0.5 * F.cross_entropy(dist_logits, teacher_labels))
    with pytest.raises(ReproError, match="distilled ViT"):
        get_term("deit_hard")(_ctx(create_model("vit_smoke_tiny", num_classes=5), teacher))


# ------------------------------------------------------------------------------------------- masked_recon

def test_masked_recon_never_reads_labels_and_learns(images):
    torch.manual_seed(7)
    student = create_model("vit_smoke_tiny", num_classes=5)
    ctx = _ctx(student)
    term = get_term("masked_recon")(ctx, mask_ratio=0.75)
    assert not term.needs_teacher
    distiller = Distiller(student, None, {"masked_recon": (1.0, term)}).train()
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(term.parameters()), lr=2e-3)
    # a batch without labels or targets: reading either raises AttributeError
    unlabeled = SimpleNamespace(images=images, indices=torch.arange(2), epoch=1)
    losses = []
    for _ in range(8):
        _, parts = distiller.forward_train(unlabeled)
        assert set(parts) == {"masked_recon"}
        optimizer.zero_grad()
        parts["masked_recon"].backward()
        optimizer.step()
        losses.append(float(parts["masked_recon"].detach()))
    assert term.mask_token.grad is not None and term.decoder.weight.grad is not None
    assert losses[-1] < losses[0]
    garbage = Batch(images=images, targets=torch.full((2,), -7), labels=torch.full((2,), 10**6),
                    indices=torch.arange(2), epoch=1)
    torch.manual_seed(0)
    _, first = distiller.forward_train(garbage)
    torch.manual_seed(0)
    _, second = distiller.forward_train(SimpleNamespace(images=images, indices=torch.arange(2), epoch=1))
    torch.testing.assert_close(first["masked_recon"], second["masked_recon"])
    student.eval()
    with torch.no_grad():  # eval forwards are unmasked
        torch.testing.assert_close(student(images), student.vit(images))
