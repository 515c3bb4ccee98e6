"""repro.models.weights, the one weights loader: the rules where the six copies it replaces disagreed."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision

import repro.models.weights as weights
from repro.core.errors import ReproError
from repro.models import create_model
from repro.models.weights import load_repdistiller, load_run_weights

pytestmark = pytest.mark.usefixtures("one_thread")
X32 = torch.randn(2, 3, 32, 32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_vit_checkpoint_with_more_blocks_than_the_model_is_refused(tmp_path: Path) -> None:
    # models/vit.py ignored every key the model lacked, so a deeper network loaded silently into a shallower one.
    source = create_model("vit_smoke_tiny", num_classes=5).vit.state_dict()
    deeper = {**source, **{k.replace("blocks.3.", "blocks.4."): v for k, v in source.items() if "blocks.3." in k}}
    torch.save({"model": deeper}, tmp_path / "deeper.pth")
    with pytest.raises(ReproError, match=r"deeper.pth does not fit the model: \d+ weights the model does not have "
                                         r"\(e\.g\. blocks\.4\."):
        create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(tmp_path / "deeper.pth"))
    # Another network in the same file (a momentum encoder) is still no reason to refuse.
    moco = {**{f"module.base_encoder.{k}": v for k, v in source.items()},
            **{f"module.momentum_encoder.{k}": v for k, v in source.items()}}
    torch.save({"state_dict": moco}, tmp_path / "moco.pth")
    loaded = create_model("vit_smoke_tiny", num_classes=5, checkpoint=str(tmp_path / "moco.pth"))
    torch.testing.assert_close(loaded.vit.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])


def test_a_moco_v3_resnet_loads_into_the_torchvision_resnet(tmp_path: Path) -> None:
    # models/imagenet.py stripped a prefix only when every key had it: base + momentum encoders were refused.
    reference = torchvision.models.resnet18(num_classes=5).eval()
    state = reference.state_dict()
    moco = {**{f"module.base_encoder.{k}": v for k, v in state.items()},
            **{f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in state.items()}}
    torch.save({"state_dict": moco, "epoch": 300, "arch": "resnet18"}, tmp_path / "moco.pth.tar")
    loaded = create_model("tv_resnet18", num_classes=5, checkpoint=str(tmp_path / "moco.pth.tar")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X32), reference(X32))


@pytest.mark.parametrize("arch", ["tv_resnet18", "vit_smoke_tiny"])
def test_checkpoints_that_pickle_python_objects_are_never_unpickled(arch: str, tmp_path: Path) -> None:
    # models/imagenet.py and models/vit.py fell back to torch.load(weights_only=False), which runs any pickle.
    path = tmp_path / "trainer.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": create_model(arch, num_classes=5).state_dict()}, path)
    with pytest.raises(ReproError, match="pickles argparse.Namespace") as err:
        create_model(arch, num_classes=5, checkpoint=str(path))
    assert str(path) in str(err.value)


def test_a_run_weights_file_that_does_not_fit_is_one_error_naming_it(tmp_path: Path) -> None:
    # runner.py called load_state_dict directly: a RuntimeError traceback.
    path = tmp_path / "model.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    model = create_model("resnet8", num_classes=10)
    assert len(load_run_weights(model, path)) == 64
    with pytest.raises(ReproError, match=r"model.pt does not fit the model: .*shape mismatches \(e\.g\. fc\.weight"):
        load_run_weights(create_model("resnet8", num_classes=100), path)
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, path)
    with pytest.raises(ReproError, match="not bare"):
        load_run_weights(model, path)


def test_a_teacher_saved_from_a_compiled_ddp_model_loads(tmp_path: Path) -> None:
    # teachers.py stripped "module." only; the one prefix rule strips every wrapper's prefix.
    model = create_model("resnet8").eval()
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "t.pth")
    with torch.no_grad():
        torch.testing.assert_close(load_repdistiller("resnet8", tmp_path / "t.pth")(X32), model(X32))


def test_timm_cnn_teachers_load_strictly(tmp_path: Path) -> None:
    torch.save(create_model("regnety_smoke", num_classes=10).state_dict(), tmp_path / "r.pth")
    assert create_model("regnety_smoke", num_classes=10, checkpoint=str(tmp_path / "r.pth")) is not None
    with pytest.raises(ReproError, match=r"r.pth does not fit the model: .*shape mismatches \(e\.g\. head\.fc"):
        create_model("regnety_smoke", num_classes=5, checkpoint=str(tmp_path / "r.pth"))


def test_repro_offline_keeps_the_hugging_face_hub_off_too(monkeypatch) -> None:
    # models/vit.py read HF_HUB_OFFLINE only; REPRO_OFFLINE is the switch for every hub (models/imagenet.py).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("REPRO_OFFLINE", "1")
    monkeypatch.setattr(weights, "host_reachable", lambda *a, **k: pytest.fail("offline: no network probe"))
    with pytest.raises(ReproError, match="offline mode is set"):
        create_model("deit_tiny_patch16_224", num_classes=1000, pretrained=True)
