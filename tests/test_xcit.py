"""SSTA on XCiT (issue 15): timm's XCiT as a model family, the three readings of its attention, head importance
on XCA and class-attention heads, distilled XCiT's one head, and the readings end to end through the runner.

References are independent of the capture code: timm's own non-fused attention (``fused_attn = False``, whose
softmax output passes through ``attn_drop``, an identity at p = 0) and a straightforward recomputation from a
block's input written out here.
"""
from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from repro.core.errors import ReproError
from repro.models import create_model
from repro.methods.attention_readings import AttentionCapture, attention_kl, default_reading
from repro.methods.head_importance import select_heads
from tests.support import tiny_ssta_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def xcit():
    torch.manual_seed(0)
    model = create_model("xcit_smoke_tiny", num_classes=5, img_size=48)  # 36 patches, d_h 16: shapes differ
    with torch.no_grad():  # a learned temperature that is not all ones, so leaving it out would show
        for block in model.vit.blocks:
            block.attn.temperature.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1))
    return model.eval()


def _images(size=48, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _seen_in_forward(module: nn.Module, model: nn.Module, x: torch.Tensor, pick: Callable) -> torch.Tensor:
    """``pick(inputs, output)`` of ``module`` during one no-grad forward of ``model``."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(pick(i, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _timm_probabilities(attn: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own softmax output: non-fused forward, read where it enters ``attn_drop``."""
    attn.fused_attn = False
    return _seen_in_forward(attn.attn_drop, model, x, lambda i, o: o)


def _block_input(attn: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _seen_in_forward(attn, model, x, lambda i, o: i[0])


def test_xca_maps_equal_timm_and_a_recomputation_with_normalisation_and_temperature(xcit):
    attn = xcit.vit.blocks[-1].attn
    capture = AttentionCapture(xcit, layer=-1, heads=[0, 3], reading="xca")
    x = _images()
    with torch.no_grad():
        xcit(x)
    log_maps = capture.pop()
    assert log_maps.shape == (2, 2, 16, 16) and log_maps.dtype == torch.float32
    # straightforward: q, k per head as [d, N], each channel L2-normalised over the tokens
    inp = _block_input(attn, xcit, x)
    batch, tokens, width = inp.shape
    q, k, _ = attn.qkv(inp).reshape(batch, tokens, 3, 4, width // 4).unbind(2)  # [B, N, H, d]
    expected = []
    for head in (0, 3):
        qh, kh = q[:, :, head].transpose(1, 2), k[:, :, head].transpose(1, 2)  # [B, d, N]
        qh, kh = qh / qh.norm(dim=-1, keepdim=True), kh / kh.norm(dim=-1, keepdim=True)
        expected.append(torch.softmax(qh @ kh.transpose(1, 2) * attn.temperature[head], dim=-1))
    assert torch.allclose(log_maps.exp(), torch.stack(expected, dim=1).detach(), atol=1e-5)
    timm_maps = _timm_probabilities(attn, xcit, x)[:, [0, 3]]
    assert torch.allclose(log_maps.exp(), timm_maps, atol=1e-5)


def test_class_attention_maps_equal_timms_non_fused_computation(xcit):
    attn = xcit.vit.cls_attn_blocks[-1].attn
    assert attn.fused_attn  # timm's default: the capture must not need it off
    capture = AttentionCapture(xcit, layer=-1, heads=None, reading="class_attention")
    x = _images()
    with torch.no_grad():
        fused_logits = xcit(x)
    log_maps = capture.pop()
    assert log_maps.shape == (2, 4, 1, 37) and attn.fused_attn
    timm_maps = _timm_probabilities(attn, xcit, x)  # [B, H, 1, N]: the CLS row
    assert torch.allclose(log_maps.exp(), timm_maps, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(xcit(x), fused_logits, atol=1e-4)  # same network either way


def test_xca_token_maps_recompute_softmax_of_raw_q_k_over_tokens(xcit):
    attn = xcit.vit.blocks[0].attn
    capture = AttentionCapture(xcit, layer=0, heads=[2], reading="xca_tokens")
    x = _images()
    with torch.no_grad():
        xcit(x)
    log_maps = capture.pop()
    inp = _block_input(attn, xcit, x)
    q, k, _ = attn.qkv(inp).reshape(2, 36, 3, 4, 16).unbind(2)
    expected = torch.softmax(q[:, :, 2] @ k[:, :, 2].transpose(1, 2) / 4.0, dim=-1)  # sqrt(16) = 4
    assert log_maps.shape == (2, 1, 36, 36)
    assert torch.allclose(log_maps[:, 0].exp(), expected.detach(), atol=1e-5)


@pytest.mark.parametrize("reading, params", [("xca", ["blocks.1.attn.qkv.weight", "blocks.1.attn.temperature"]),
                                             ("class_attention", ["cls_attn_blocks.1.attn.q.weight",
                                                                  "cls_attn_blocks.1.attn.k.weight"]),
                                             ("xca_tokens", ["blocks.1.attn.qkv.weight"])])
def test_student_maps_are_float32_in_the_graph_under_bf16_autocast(xcit, reading, params):
    xcit.train()
    capture = AttentionCapture(xcit, layer=-1, heads=[0, 1], reading=reading, training_only=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xcit(_images())
    student = capture.pop()
    assert student.dtype == torch.float32 and student.requires_grad
    target = torch.log_softmax(torch.randn_like(student), dim=-1)
    attention_kl(target, student).backward()
    named = dict(xcit.vit.named_parameters())
    for name in params:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


def test_xcit_defaults_to_class_attention_and_refuses_unknown_or_foreign_readings(xcit):
    assert default_reading(xcit) == "class_attention"
    assert default_reading(create_model("vit_smoke_tiny", num_classes=5)) == "token"
    with pytest.raises(ReproError, match="does not apply"):
        AttentionCapture(xcit, reading="token")
    with pytest.raises(ReproError, match="does not apply"):
        AttentionCapture(create_model("vit_smoke_tiny", num_classes=5), reading="xca")
    with pytest.raises(ReproError, match="unknown attention reading"):
        AttentionCapture(xcit, reading="channels")
    with pytest.raises(ReproError, match="relation"):
        AttentionCapture(xcit, mode="relation", reading="xca")
    with pytest.raises(ReproError, match="out of range"):
        AttentionCapture(xcit, layer=2, reading="class_attention")  # two class-attention blocks


# ------------------------------------------------------------------------------------------ head importance

def _silence(model: nn.Module, attns: list[nn.Module], keep: dict[int, int]) -> None:
    """Zero the output-projection columns of every head of ``attns`` except ``keep[layer]``."""
    with torch.no_grad():
        for layer, attn in enumerate(attns):
            width = attn.proj.in_features // attn.num_heads
            for head in range(attn.num_heads):
                if keep.get(layer, -1) != head:
                    attn.proj.weight[:, head * width:(head + 1) * width] = 0


def _batches(size=32):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, size, size, generator=generator), torch.randint(5, (4,), generator=generator))
            for _ in range(2)]


@pytest.mark.parametrize("reading", ["xca", "class_attention"])
def test_gradient_importance_finds_the_decisive_xca_or_class_attention_head(reading):
    torch.manual_seed(2)
    model = create_model("xcit_smoke_small", num_classes=5)  # 8 heads
    attns = [b.attn for b in (model.vit.blocks if reading == "xca" else model.vit.cls_attn_blocks)]
    _silence(model, attns, {0: 3, 1: 6})  # last layer of the reading: only head 6 reaches the output
    selection = select_heads(model, "importance", _batches(), loss="ce", reading=reading)
    assert selection.pairs == [(1, 6)]
    assert len(selection.scores) == 2 and len(selection.scores[1]) == 8
    assert selection.scores[1][6] == pytest.approx(1.0) and sum(selection.scores[1]) == pytest.approx(1.0)
    label_free = select_heads(model, "importance", [x for x, _ in _batches()], loss="feature", reading=reading)
    assert label_free.pairs == [(1, 6)]


# ------------------------------------------------------------------------------------------ models and weights

def test_named_xcits_are_timms_with_the_papers_shapes_and_fail_fast_offline():
    from timm.models.xcit import Xcit

    tiny = create_model("xcit_tiny_12_p16_224", num_classes=10, drop_path_rate=0.05)
    assert isinstance(tiny.vit, Xcit) and len(tiny.vit.blocks) == 12 and len(tiny.vit.cls_attn_blocks) == 2
    attn = tiny.vit.blocks[0].attn
    assert (attn.num_heads, attn.qkv.in_features // attn.num_heads) == (4, 48)  # d_h 48, as XCiT-S12's
    assert not tiny.is_distilled and tiny.vit.blocks[5].drop_path1.drop_prob == 0.05  # constant, as xcit.py
    with pytest.raises(ReproError, match="could not be loaded"):
        create_model("xcit_small_12_p16_224_distilled", pretrained=True)
    with pytest.raises(ReproError, match="dino_xcit_small_12_p16_pretrain.pth"):
        create_model("dino_xcit_small_12_p16", pretrained=True)


def test_a_dino_style_checkpoint_without_classifier_loads(tmp_path):
    """DINO's XCiT backbones use the official layout (fused class-attention qkv, ``pos_embeder``) and no head."""
    source = create_model("xcit_smoke_small", num_classes=0)
    state = {}
    for key, value in source.vit.state_dict().items():
        key = key.replace("pos_embed.", "pos_embeder.")
        state[key] = value
    for i in range(2):  # official class attention: one qkv projection
        for part in ("weight", "bias"):
            state[f"cls_attn_blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [state.pop(f"cls_attn_blocks.{i}.attn.{n}.{part}") for n in "qkv"])
    path = tmp_path / "dino_xcit_smoke_pretrain.pth"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    with pytest.warns(UserWarning, match="classifier"):
        loaded = create_model("xcit_smoke_small", num_classes=1000, checkpoint=str(path))
    x = _images(32)
    source.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, is_feat=True)[0][1], source(x, is_feat=True)[0][1], atol=1e-5)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if "blocks.0." not in k}, broken)
    with pytest.raises(ReproError, match="weights missing"):
        create_model("xcit_smoke_small", num_classes=1000, checkpoint=str(broken))


def test_distilled_xcit_has_one_head_for_ce_the_hard_kd_and_evaluation():
    from repro.analyses.resolve import with_head
    from repro.data.batch import Batch
    from repro.methods import Outputs, TermContext, get_term

    torch.manual_seed(0)
    student = create_model("xcit_smoke_tiny_distilled", num_classes=5).train()
    teacher = create_model("xcit_smoke_small", num_classes=5).eval()
    ctx = TermContext(student=student, teacher=teacher, num_classes=5, train_labels=torch.arange(8) % 5,
                      device=torch.device("cpu"), epochs=2)
    term = get_term("deit_hard")(ctx)
    x = _images(32, batch=4)
    logits = student(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    batch = Batch(images=x, targets=torch.arange(4), labels=torch.arange(4), indices=torch.arange(4), epoch=1)
    loss = term(Outputs(logits=logits, teacher_logits=teacher_logits), batch)
    # xcit.py returns (x, x): the hard KD is CE of the very logits CE reads against the teacher's argmax
    assert torch.allclose(loss, F.cross_entropy(logits, teacher_logits.argmax(1)))
    evaluated, head = with_head(student.eval(), None)
    assert head == "shared" and evaluated is student
    with pytest.raises(ReproError, match="distilled"):
        get_term("deit_hard")(TermContext(student=create_model("xcit_smoke_tiny", num_classes=5), teacher=teacher,
                                          num_classes=5, train_labels=torch.arange(8) % 5,
                                          device=torch.device("cpu"), epochs=2))


# ------------------------------------------------------------------------------------------ end to end

READINGS = ("xca", "class_attention", "xca_tokens")
TINY_SPEC = tiny_ssta_spec(
    "test/ssta-xcit-tiny", "tiny SSTA on XCiT end to end", "test-ssta-xcit",
    methods={f"SSTA {reading}": {
        "losses": {"ce": 1.0, "ssta_attn": {"weight": 1.0, "stop_epoch": 150, "stop_epoch_of": 400,
                                            "head_batches": 1, "reading": reading}},
        "recipe": {"epochs": 400}, "tier_recipe": {"smoke": {"epochs": 1}}} for reading in READINGS},
    cells=[{"teacher": "xcit_small_12_p16_224", "student": "xcit_tiny_12_p16_224",
            "assistant": "dino_xcit_small_12_p16", "method": f"SSTA {reading}",
            "reported": {"status": "not_transcribed"}} for reading in READINGS])


@pytest.mark.slow  # three SSTA runs end to end: the heaviest of the fast suite, so `make test-all` only
def test_the_three_readings_run_end_to_end_and_are_recorded_in_result_json(tmp_path, monkeypatch):
    from repro.harness.plan import make_plan
    from repro.harness.execute import execute
    from repro.harness.spec import load_spec
    from repro.harness.store import RunStore

    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "data"))
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(TINY_SPEC))
    spec = load_spec(str(spec_file))
    full = make_plan(spec, "full")
    assert {full.runs[c.run_ids[0]].config["recipe"]["epochs"] for c in full.cells} == {400}
    plan = make_plan(spec, "smoke")
    store = RunStore(tmp_path / "runs")
    summary = execute(plan, store, torch.device("cpu"), progress=False)
    assert sorted(summary.done) == sorted(plan.runs) and not summary.failed
    for cell_runs in plan.cells:
        reading = cell_runs.cell.method.split()[-1]
        result = json.loads((store.run_dir(cell_runs.run_ids[0]) / "result.json").read_text())
        report = result["term_reports"]["ssta_attn"]
        assert report["reading"] == reading
        assert {role: entry["reading"] for role, entry in report["heads"].items()} == {"teacher": reading, "ta": reading}
        assert report["stop_epochs"] == {"teacher": 1, "ta": 1}
        assert store.metrics(cell_runs.run_ids[0])[0].keys() >= {"loss_ce", "loss_ssta_attn"}


def test_repro_eval_accepts_a_distilled_xcit_student_and_records_its_one_head(tmp_path):
    import repro.cli

    torch.manual_seed(0)
    path = tmp_path / "xcit.pt"
    torch.save(create_model("xcit_smoke_tiny_distilled", num_classes=1000).state_dict(), path)
    out = tmp_path / "record.json"
    suites = ("clean", "imagenet-c", "shape-bias", "top10")
    code = repro.cli.main(["eval", str(path), "--arch", "xcit_smoke_tiny_distilled", "--suite", ",".join(suites),
                           "--other", str(path), "--other-arch", "xcit_smoke_tiny", "--corruptions", "gaussian_noise",
                           "--synthetic", str(tmp_path / "data"), "--out", str(out), "--device", "cpu",
                           "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert set(record["suites"]) == set(suites) and record["options"]["image_size"] == 32
    assert record["model"]["arch"] == "xcit_smoke_tiny_distilled" and record["model"]["head"] == "shared"
    assert 0.0 <= record["suites"]["shape-bias"]["shape_bias"] <= 1.0


def test_xca_channel_maps_need_equal_head_dimensions():
    from repro.methods import TermContext, get_term

    from timm.models.xcit import Xcit

    from repro.models.xcit import TimmXCiT

    student = create_model("xcit_smoke_tiny", num_classes=5)  # d_h 16
    teacher = TimmXCiT(Xcit(img_size=32, patch_size=8, num_classes=5, embed_dim=128, depth=2, num_heads=4))  # d_h 32
    ctx = TermContext(student=student, teacher=teacher, num_classes=5, train_labels=torch.arange(8) % 5,
                      device=torch.device("cpu"), epochs=2)
    with pytest.raises(ReproError, match="head dimension"):
        get_term("ssta_attn")(ctx, lam=0.0, teacher_head=0, reading="xca")
    term = get_term("ssta_attn")(ctx, lam=0.0, teacher_head=0, reading="class_attention")  # any head dim
    assert term.report()["reading"] == "class_attention"
    with pytest.raises(ReproError, match="cannot be read"):
        get_term("ssta_attn")(TermContext(student=student, teacher=create_model("vit_smoke_tiny", num_classes=5),
                                          num_classes=5, train_labels=torch.arange(8) % 5,
                                          device=torch.device("cpu"), epochs=2), lam=0.0, teacher_head=0)


def test_a_probe_on_an_xcit_reads_its_output_features_as_dino_does():
    from repro.methods.head_importance import last_blocks_features, pooled_features

    model = create_model("xcit_smoke_tiny", num_classes=0).eval()
    x = _images(32)
    with torch.no_grad():
        assert torch.equal(last_blocks_features(model, x), pooled_features(model, x))
    with pytest.raises(ReproError, match="output features"):
        last_blocks_features(model, x, n_last_blocks=4)


@pytest.mark.parametrize("reading", ["xca", "class_attention", "xca_tokens"])
def test_disabled_and_eval_mode_student_captures_record_nothing(xcit, reading):
    capture = AttentionCapture(xcit, layer=-1, heads=[0], reading=reading, training_only=True)
    with torch.no_grad():
        xcit.eval()(_images())  # a student capture skips eval forwards
        assert capture.maps is None
        capture.enabled = False  # after the early stop
        xcit.train()(_images())
    assert capture.maps is None
    capture.enabled = True
    xcit(_images())
    assert capture.pop().shape[1] == 1
