"""Shape bias: the 16-class data, the mean mapping on a hand-made probability vector, file-name parsing, the
metric on fixed decisions (hand-computed, with a no-conflict image), and the suite on synthetic stimuli."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
from timm.data import ImageNetInfo

from repro.data.cue_conflict_synthetic import write_synthetic_cue_conflict
from repro.core.errors import ReproError
from repro.analyses import SUITES
from repro.analyses.shape_bias import (
    CATEGORIES,
    SIXTEEN_CLASS_FILE,
    map_to_16_classes,
    shape_bias_from_decisions,
    sixteen_class_indices,
    texture_class_from_filename,
)
from repro.harness.render.analysis_plots import plot_shape_bias

AIRPLANE = 404  # the only ImageNet index of "airplane" (airliner)


class ConstantLogits(nn.Module):
    def __init__(self, num_classes: int, winner: int) -> None:
        super().__init__()
        self.register_buffer("logits", 10 * torch.nn.functional.one_hot(torch.tensor(winner), num_classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_sixteen_class_data_matches_model_vs_human():
    indices = sixteen_class_indices()
    assert list(indices) == sorted(indices) == list(CATEGORIES) and len(indices) == 16
    flat = [i for values in indices.values() for i in values]
    assert len(flat) == len(set(flat)) == 207 and all(0 <= i < 1000 for i in flat)
    assert indices["airplane"] == [AIRPLANE] and indices["oven"] == [766] and indices["knife"] == [499]
    assert indices["bear"] == [294, 295, 296, 297] and len(indices["dog"]) == 109 and len(indices["bird"]) == 49
    synsets = ImageNetInfo().label_names()
    table = json.loads(SIXTEEN_CLASS_FILE.read_text())
    for name, entry in table["categories"].items():
        assert entry["wnids"] == [synsets[i] for i in entry["indices"]], name
    assert table["aggregation"] == "mean" and "model-vs-human" in table["source"]


def test_mapping_averages_each_category_on_a_hand_made_vector():
    probs = torch.zeros(1, 1000)
    probs[0, AIRPLANE] = 0.2
    probs[0, [294, 295, 296, 297]] = 0.1  # bear: 4 indices
    probs[0, 152] = 0.3  # one of dog's 109 indices
    probs[0, 0] = 0.1  # tench: in no category
    scores = map_to_16_classes(probs)[0]
    expected = dict.fromkeys(CATEGORIES, 0.0) | {"airplane": 0.2, "bear": 0.1, "dog": 0.3 / 109}
    assert scores.tolist() == pytest.approx([expected[c] for c in CATEGORIES])
    assert CATEGORIES[scores.argmax()] == "airplane"
    assert CATEGORIES[map_to_16_classes(probs, "sum")[0].argmax()] == "bear"  # why the aggregation matters
    with pytest.raises(ReproError, match="1000"):
        map_to_16_classes(torch.zeros(1, 10))


def test_texture_class_from_file_names():
    assert texture_class_from_filename("airplane1-bicycle2.png") == "bicycle"
    assert texture_class_from_filename("/data/cue/knife/knife3-elephant10.png") == "elephant"
    assert texture_class_from_filename("0001_cc_dnn_dog10-bird2.png") == "bird"  # model-vs-human trial prefix
    with pytest.raises(ReproError, match="airplane1.png"):
        texture_class_from_filename("airplane1.png")


def test_shape_bias_on_fixed_decisions():
    shapes = ["cat", "cat", "cat", "cat", "dog", "dog", "dog", "car"]
    textures = ["dog", "bird", "cat", "car", "cat", "clock", "knife", "car"]
    decisions = ["cat", "bird", "cat", "bear", "cat", "dog", "dog", "car"]
    # cat: shape 1 (img 1), texture 1 (img 2), img 3 has no conflict, img 4 neither -> 1/2
    # dog: texture 1 (img 5), shape 2 (imgs 6, 7) -> 2/3; car: only a no-conflict image -> no entry
    result = shape_bias_from_decisions(shapes, textures, decisions)
    assert result["per_class"] == {"cat": pytest.approx(0.5), "dog": pytest.approx(2 / 3)}
    assert result["shape_bias"] == pytest.approx(3 / 5)  # counting img 3 and 8 would give 5/7
    assert result["fraction_shape"] == pytest.approx(3 / 8) and result["fraction_texture"] == pytest.approx(2 / 8)
    assert (result["n_images"], result["n_cue_conflict"]) == (8, 6)
    assert result["per_class_counts"]["dog"] == {"shape": 2, "texture": 1}
    none = shape_bias_from_decisions(["cat"], ["dog"], ["bear"])
    assert none["shape_bias"] is None and none["per_class"] == {"cat": None}


def test_suite_on_synthetic_cue_conflict(tmp_path):
    files = write_synthetic_cue_conflict(tmp_path, images_per_class=3, image_size=32)
    shape_of = {f: f.parent.name for f in files}
    texture_of = {f: f.stem.split("-")[1].rstrip("0123456789") for f in files}
    assert any(shape_of[f] == texture_of[f] for f in files)  # the set has no-conflict images to drop
    expected_shape = sum(shape_of[f] == "airplane" != texture_of[f] for f in files)
    expected_texture = sum(texture_of[f] == "airplane" != shape_of[f] for f in files)
    assert expected_shape > 0 and expected_texture > 0

    model = ConstantLogits(1000, AIRPLANE)  # every decision is "airplane"
    cfg = {"num_workers": 0, "progress": False, "shape-bias": {"root": str(tmp_path), "image_size": 32}}
    result = SUITES.get("shape-bias")(model, cfg, "cpu")
    assert (result["n_shape_decisions"], result["n_texture_decisions"]) == (expected_shape, expected_texture)
    assert result["shape_bias"] == pytest.approx(expected_shape / (expected_shape + expected_texture))
    assert result["per_class"]["airplane"] == 1.0
    texture_victims = {shape_of[f] for f in files if texture_of[f] == "airplane" != shape_of[f]}
    assert all(result["per_class"][c] == 0.0 for c in texture_victims)
    assert result["per_class"]["cat"] is None  # neither its shape nor its textures were ever chosen
    assert result["n_images"] == len(files) and result["protocol"]["eval_transform"]["center_crop"] == 32
    assert "mean" in result["protocol"]["decision"]


def test_suite_refuses_bad_folders_and_non_imagenet_models(tmp_path):
    write_synthetic_cue_conflict(tmp_path, images_per_class=1, image_size=32, categories=["airplane", "zebra"])
    cfg = {"num_workers": 0, "progress": False, "shape-bias": {"root": str(tmp_path), "image_size": 32}}
    with pytest.raises(ReproError, match="zebra"):
        SUITES.get("shape-bias")(ConstantLogits(1000, 0), cfg, "cpu")
    (tmp_path / "zebra").rename(tmp_path / "bear")
    for f in (tmp_path / "airplane").iterdir():
        f.rename(f.with_name("airplane1-bear1.png"))
    for f in (tmp_path / "bear").iterdir():
        f.rename(f.with_name("bear1-airplane1.png"))
    with pytest.raises(ReproError, match="1000"):
        SUITES.get("shape-bias")(ConstantLogits(10, 0), cfg, "cpu")


def test_plot_shape_bias_writes_a_png(tmp_path):
    results = {"deit_s": {"cat": 0.3, "dog": 0.5, "car": None}, "ssta": {"cat": 0.6, "dog": 0.7, "car": 0.9}}
    path = plot_shape_bias(results, tmp_path / "sb.png", stamp="tier=smoke commit=abc", overall={"deit_s": 0.42})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
