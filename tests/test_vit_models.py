"""ViT model family: names, class counts, the feature contract, distilled heads, checkpoints, offline errors."""
from __future__ import annotations

import pytest
import torch

import repro.models.weights as weights
from repro.core.errors import ReproError
from repro.models import create_model, model_names

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name,classes", [("vit_smoke_tiny", 5), ("vit_smoke_small", 7),
                                          ("vit_smoke_tiny_distilled", 3), ("vit_smoke_small_distilled", 4)])
def test_smoke_vits_build_with_class_count(name, classes):
    model = create_model(name, num_classes=classes)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, classes)
    heads = model.vit.blocks[0].attn.num_heads
    assert heads == (3 if "tiny" in name else 6)


def test_timm_names_are_registered_and_build():
    names = set(model_names())
    for name in ("deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "deit_base_patch16_224",
                 "vit_small_patch16_224.dino", "vit_base_patch16_224.mae", "timm_vit"):
        assert name in names
    model = create_model("deit_tiny_patch16_224", num_classes=9, img_size=32)
    assert model.vit.head.out_features == 9
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 9)
    generic = create_model("timm_vit", num_classes=4, timm_name="vit_tiny_patch16_224", img_size=32)
    assert generic(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_feature_contract():
    model = create_model("vit_smoke_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, logits = model(x, is_feat=True)
    assert len(feats) == 5  # blocks 1-3, the final normalised tokens, the pooled vector (depth 4)
    assert all(f.shape == (2, 65, 96) for f in feats[:-1]) and feats[-1].shape == (2, 96)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(logits, model.vit.head(feats[-1]))
    # the last two entries are what the contract returned before per-block features (unchanged behaviour)
    torch.testing.assert_close(feats[-2], model.vit.forward_features(x))
    torch.testing.assert_close(feats[-1], model.vit.forward_head(model.vit.forward_features(x), pre_logits=True))
    assert model.num_prefix_tokens == 1 and model.embed_dim == 96


def test_feature_contract_block_outputs_are_the_blocks_own():
    # An independent walk through timm's blocks: patch embed, position embed, pre-norm, block by block.
    model = create_model("vit_smoke_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, _ = model(x, is_feat=True)
    vit = model.vit
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, block in enumerate(vit.blocks):
        tokens = block(tokens)
        expected = vit.norm(tokens) if i == len(vit.blocks) - 1 else tokens
        torch.testing.assert_close(feats[i], expected)
    assert not any(block._forward_hooks for block in vit.blocks)  # the hooks are gone after the call
    distilled = create_model("vit_smoke_tiny_distilled", num_classes=5)
    assert distilled.num_prefix_tokens == 2


def test_distilled_heads_average_unless_distilled_training():
    model = create_model("vit_smoke_tiny_distilled", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    feats, averaged = model(x, is_feat=True)
    tokens = feats[-2]
    cls_logits = model.vit.head(tokens[:, 0])
    dist_logits = model.vit.head_dist(tokens[:, 1])
    torch.testing.assert_close(averaged, (cls_logits + dist_logits) / 2)  # timm's default, train == eval
    model.set_distilled_training(True)
    torch.testing.assert_close(model(x), cls_logits)
    model.eval()
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    with pytest.raises(ReproError):
        create_model("vit_smoke_tiny", num_classes=5).set_distilled_training(True)


def test_checkpoint_round_trip_with_prefixes(tmp_path):
    source = create_model("vit_smoke_tiny", num_classes=5).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x))


def test_checkpoint_without_classifier_loads_backbone(tmp_path):
    source = create_model("vit_smoke_tiny", num_classes=5)
    path = tmp_path / "ssl.pth"
    torch.save({k: v for k, v in source.vit.state_dict().items() if not k.startswith("head.")}, path)
    with pytest.warns(UserWarning, match="classifier"):
        loaded = create_model("vit_smoke_tiny", num_classes=8, checkpoint=str(path))
    torch.testing.assert_close(loaded.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ReproError, match="not found"):
        create_model("deit_tiny_patch16_224", num_classes=5, checkpoint=str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save(create_model("vit_smoke_small", num_classes=5).state_dict(), other)
    with pytest.raises(ReproError, match="does not fit"):
        create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(other))
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 1, "note": "no weights"}, junk)
    with pytest.raises(ReproError, match="no state dict"):
        create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(junk))
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ReproError, match="could not be read"):
        create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(text))


def test_pretrained_offline_is_one_clear_error():
    with pytest.raises(ReproError, match="checkpoint=<local file>"):
        create_model("deit_tiny_patch16_224", num_classes=1000, pretrained=True)


def test_pretrained_with_unreachable_hub_does_not_retry(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("REPRO_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "host_reachable", lambda host, *a, **k: False)
    with pytest.raises(ReproError, match="unreachable"):
        create_model("vit_small_patch16_224.dino", num_classes=0, pretrained=True)


def test_xcit_is_its_own_family_and_unknown_names_are_refused():
    # XCiT names build timm's Xcit (repro/models/xcit.py, tests/test_xcit.py); the generic ViT path points there
    assert type(create_model("xcit_smoke_tiny", num_classes=10)).__name__ == "TimmXCiT"
    with pytest.raises(ReproError, match="XCiT models are registered by name"):
        create_model("timm_vit", num_classes=10, timm_name="xcit_small_12_p16_224")
    with pytest.raises(ReproError, match="could not build"):
        create_model("timm_vit", num_classes=10, timm_name="no_such_vit")
    with pytest.raises(ReproError, match="not a timm VisionTransformer"):
        create_model("timm_vit", num_classes=10, timm_name="resnet18")
