"""WTTM ImageNet specs (Tables 5, 7, 13) and their models: class counts, the feature contract, weights offline,
the teacher-accuracy gate, and every reported number against the ledger (wttm.md section 4.3)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml

import repro.models.weights as weights
from repro.core.errors import ReproError
from repro.methods import LOSS_TERMS
from repro.models import create_model
from repro.harness.plan import make_plan
from repro.harness.execute import evaluate_checkpoint
from repro.papers import spec_files
from repro.harness.spec import load_spec, spec_path
from repro.train.loop import RunFailed

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
SPECS = {"wttm/imagenet-table5": "T5", "wttm/imagenet-table7": "T7", "wttm/deit-table13": "T13"}
X32 = torch.randn(2, 3, 32, 32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ledger(tag: str) -> list[tuple[tuple[str, str, str], float | None]]:
    return [((r["teacher"], r["student"], r["method"]), None if r["value"] == "n/a" else float(r["value"]))
            for r in csv.DictReader((DATA / "wttm_reported.csv").open()) if r["table"] == tag]


# -- the ledger ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_id", sorted(SPECS))
def test_reported_numbers_equal_the_ledger_in_paper_order(spec_id):
    spec = load_spec(spec_id)
    got = [((c.teacher, c.student, c.method), c.reported.mean) for c in spec.cells]
    assert got == ledger(SPECS[spec_id])
    assert all(c.reported.std is None for c in spec.cells)  # ImageNet rows are single runs without a std


def test_wttm_gamma_and_beta_follow_table_10():
    table10 = {(r["teacher"], r["student"]): r for r in csv.DictReader((DATA / "wttm_hparams.csv").open())
               if r["table"] == "T10"}
    checked = 0
    for spec_id in ("wttm/imagenet-table5", "wttm/imagenet-table7"):
        for cell in load_spec(spec_id).cells:
            if cell.method == "WTTM":
                row = table10[(cell.teacher, cell.student)]
                assert cell.params["wttm"] == {"gamma": float(row["gamma"]), "weight": float(row["beta_on_(W)TTM_term"])}
                assert cell.provenance["params.wttm"].source == "appendix"
                checked += 1
    assert checked == 2 + 4
    deit_wttm = next(c for c in load_spec("wttm/deit-table13").cells if c.method == "WTTM")
    assert deit_wttm.provenance["params.wttm"].source == "assumption"  # the paper gives no DeiT gamma/beta


@pytest.mark.parametrize("spec_id", sorted(SPECS))
def test_every_recipe_setting_has_provenance_and_every_term_exists(spec_id):
    spec = load_spec(spec_id)
    raw = yaml.safe_load(spec_path(spec_id).read_text())
    if raw.get("base"):
        raw = yaml.safe_load(spec_files()[raw['base']].read_text())
    assert set(raw["recipe"]) <= set(spec.recipe_provenance)
    for method in spec.methods.values():
        assert all(name in LOSS_TERMS for name in method.losses)


# -- plans ---------------------------------------------------------------------------------------------------
def test_full_tier_teachers_are_gated_pretrained_evaluations():
    expected = {"tv_resnet34": 73.31, "tv_resnet50": 76.13, "tv_resnet101": 77.37, "tv_resnet152": 78.31,
                "deit3_small_patch16_224.fb_in22k_ft_in1k": 82.76}
    seen: dict[str, set[str]] = {}
    for spec_id in SPECS:
        for run in make_plan(load_spec(spec_id), "full").ordered():
            if run.config["kind"] == "eval":
                model = run.config["model"]
                assert model["args"]["pretrained"] is True and model["num_classes"] == 1000
                assert run.config["expected_top1"] == expected[model["arch"]]
                assert run.config["gate_tolerance"] == 0.5
                seen.setdefault(model["arch"], set()).add(run.run_id)
    assert set(seen) == set(expected)
    assert all(len(ids) == 1 for ids in seen.values())  # Tables 5 and 7 share one evaluation per teacher


def test_table7_kd_is_not_table5_kd_and_smoke_teachers_are_trained():
    def kd_losses(spec_id):
        plan = make_plan(load_spec(spec_id), "full")
        cell = next(c for c in plan.cells if c.cell.method == "KD" and c.cell.teacher == "ResNet-34")
        return plan.runs[cell.run_ids[0]].config["losses"]

    assert kd_losses("wttm/imagenet-table5")["kd"]["temperature"] == 1.0
    assert kd_losses("wttm/imagenet-table7")["kd"]["temperature"] == 4.0
    for spec_id in SPECS:
        plan = make_plan(load_spec(spec_id), "smoke")
        teachers = [r for r in plan.ordered() if "teacher" in r.label]
        assert teachers and all(r.config["kind"] == "train" and r.config["recipe"]["epochs"] == 4 for r in teachers)


# -- models --------------------------------------------------------------------------------------------------
def _spec_models() -> list[tuple[str, dict]]:
    """(arch, create_model args) of every model the three specs build, at the smoke tier's small size."""
    models = {}
    for spec_id in SPECS:
        for run in make_plan(load_spec(spec_id), "smoke").ordered():
            models[run.config["model"]["arch"]] = run.config["model"]["args"]
    return sorted(models.items())


def test_the_specs_name_these_models():
    assert [arch for arch, _ in _spec_models()] == sorted([
        "deit3_small_patch16_224.fb_in22k_ft_in1k", "deit_tiny_patch16_224", "mobilenet_v1",
        "tv_resnet101", "tv_resnet152", "tv_resnet18", "tv_resnet34", "tv_resnet50"])


@pytest.mark.parametrize("arch,args", _spec_models())
def test_spec_models_build_with_the_class_count(arch, args):
    model = create_model(arch, num_classes=7, **args).eval()
    with torch.no_grad():
        assert model(X32).shape == (2, 7)


@pytest.mark.parametrize("arch,stages", [("tv_resnet18", 4), ("mobilenet_v1", 5)])
def test_feature_contract_and_preactivations(arch, stages):
    model = create_model(arch, num_classes=5).eval()
    with torch.no_grad():
        logits = model(X32)
        feats, feat_logits = model(X32, is_feat=True)
        pre, pre_logits = model(X32, is_feat=True, preact=True)
    assert len(feats) == len(pre) == stages + 2  # stem, stages, pooled vector
    torch.testing.assert_close(feat_logits, logits)
    torch.testing.assert_close(pre_logits, logits)
    torch.testing.assert_close(pre[-1], feats[-1])
    assert feats[-1].ndim == 2
    for before, after in zip(pre[:-1], feats[:-1]):
        assert (before < 0).any()  # really before the activation ...
        torch.testing.assert_close(F.relu(before), after)  # ... and exactly what the activation turns into it
    hooks = [m for m in model.modules() if m._forward_pre_hooks]
    assert not hooks  # the capture leaves no hook behind


# -- weights -------------------------------------------------------------------------------------------------
def test_torchvision_checkpoints_load_with_their_own_keys(tmp_path):
    reference = torchvision.models.resnet18(num_classes=5)
    model = create_model("tv_resnet18", num_classes=5)
    assert list(model.state_dict()) == list(reference.state_dict())
    wrapped = {"model": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}  # DDP trainer file
    torch.save(wrapped, tmp_path / "r18.pt")
    loaded = create_model("tv_resnet18", num_classes=5, checkpoint=str(tmp_path / "r18.pt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X32), reference.eval()(X32))


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r18.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ReproError, match="not found"):
        create_model("tv_resnet18", num_classes=5, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ReproError, match="could not be read"):
        create_model("tv_resnet18", num_classes=5, checkpoint=str(tmp_path / "junk.pt"))
    with pytest.raises(ReproError, match="weights missing"):
        create_model("tv_resnet34", num_classes=5, checkpoint=str(tmp_path / "r18.pt"))
    with pytest.raises(ReproError, match="shape mismatches"):
        create_model("tv_resnet50", num_classes=5, checkpoint=str(tmp_path / "r18.pt"))
    with pytest.raises(ReproError, match="does not fit"):
        create_model("mobilenet_v1", num_classes=5, checkpoint=str(tmp_path / "r18.pt"))


def test_pretrained_without_network_fails_with_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ReproError, match="not in the local cache .* offline mode"):
        create_model("tv_resnet50", pretrained=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("REPRO_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "host_reachable", lambda host, *a, **k: False)
    with pytest.raises(ReproError, match="download.pytorch.org is unreachable"):
        create_model("tv_resnet18", pretrained=True)
    cached = weights.cached_hub_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    with pytest.raises(ReproError, match="corrupt"):
        create_model("tv_resnet18", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReproError, match="ReLU6"):
        create_model("mobilenet_v1", pretrained=True)
    for arch, kwargs in (("mobilenet_v1", {"act_layer": "relu6"}), ("deit3_small_patch16_224.fb_in22k_ft_in1k", {})):
        with pytest.raises(ReproError, match="could not be loaded"):
            create_model(arch, pretrained=True, **kwargs)


# -- the teacher-accuracy gate ---------------------------------------------------------------------------------
def test_teacher_gate_refuses_a_teacher_off_its_reported_accuracy(tmp_path):
    recipe = load_spec("wttm/imagenet-table5").recipe_for("smoke").for_training("tv_resnet18").model_dump()
    recipe["data"] = {**recipe["data"], "root": str(tmp_path / "folder"),
                      "synthetic": {"classes": 3, "per_class": 4, "val_per_class": 4, "size": 32, "seed": 0}}
    recipe["batch_size"] = 4
    torch.save(create_model("tv_resnet18", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    config = {"kind": "eval", "tier": "smoke", "checkpoint": None, "gate_tolerance": 0.5, "recipe": recipe,
              "model": {"arch": "tv_resnet18", "num_classes": 3, "args": {"checkpoint": str(tmp_path / "teacher.pt")}}}
    measured = evaluate_checkpoint({**config, "expected_top1": None}, torch.device("cpu"))["best_top1"]
    assert evaluate_checkpoint({**config, "expected_top1": measured}, torch.device("cpu"))["best_top1"] == measured
    expected = 100.0 if measured < 50 else 0.0
    with pytest.raises(RunFailed, match=rf"measured {measured:.2f} vs expected {expected:.2f}") as failure:
        evaluate_checkpoint({**config, "expected_top1": expected}, torch.device("cpu"))
    assert failure.value.details["best_top1"] == measured
