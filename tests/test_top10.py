"""Top-10 categories: per-class counts and the ranking rules on fixed predictions, the two-model suite and the
clean top-1/top-5 suite on a synthetic labelled folder, the registry, and the plot."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from repro.data.imagefolder import write_synthetic_imagefolder
from repro.core.errors import ReproError
from repro.analyses import SUITES, run_suites
from repro.analyses.top10 import RANK_RULES, TABLE_COLUMNS, per_class_correct, top10_table
from repro.harness.render.analysis_plots import plot_top10
from tests.support import ConstantLogits


def test_per_class_correct_on_fixed_predictions():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 0, 1, 0, 2, 2, 2, 0])
    correct, total = per_class_correct(predictions, labels, num_classes=4)
    assert correct.tolist() == [2, 1, 3, 0]
    assert total.tolist() == [3, 2, 4, 0]


def test_largest_difference_ranks_both_ways_with_index_tie_break():
    names = ["c0", "c1", "c2", "c3", "c4"]
    correct = {"teacher": np.array([5, 9, 3, 7, 7]), "ta": np.array([5, 2, 8, 3, 3])}
    total = np.full(5, 10)
    table = top10_table(correct, total, names, k=2)
    assert list(table.columns) == TABLE_COLUMNS
    # differences teacher - ta: [0, 7, -5, 4, 4] -> teacher>ta: c1 (7), then c3 and c4 tie at 4 -> c3 (lower index)
    first = table[(table.group == "teacher > ta") & (table.model == "teacher")]
    assert first.class_name.tolist() == ["c1", "c3"] and first["rank"].tolist() == [1, 2]
    assert first.difference.tolist() == [7, 4]
    second = table[(table.group == "ta > teacher") & (table.model == "ta")]
    assert second.class_name.tolist() == ["c2", "c0"] and second.correct.tolist() == [8, 5]
    assert len(table) == 2 * 2 * 2  # groups x ranks x models
    row = table[(table.class_name == "c2") & (table.model == "teacher")].iloc[0]
    assert (row.correct, row.total, row.accuracy, row.difference) == (3, 10, 30.0, -5)


def test_top_correct_rule_and_unknown_rule():
    correct = {"a": np.array([1, 4, 4, 0]), "b": np.array([3, 0, 1, 2])}
    table = top10_table(correct, np.full(4, 5), ["w", "x", "y", "z"], rule="top-correct", k=3)
    assert table[(table.group == "top of a") & (table.model == "a")].class_name.tolist() == ["x", "y", "w"]
    assert table[(table.group == "top of b") & (table.model == "b")].class_name.tolist() == ["w", "z", "y"]
    assert "largest-difference" in RANK_RULES and "top-correct" in RANK_RULES
    with pytest.raises(ReproError, match="largest-difference"):
        top10_table(correct, np.full(4, 5), ["w", "x", "y", "z"], rule="biggest")


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return write_synthetic_imagefolder(root, classes=5, per_class=2, size=32, splits=("val",)) / "val"


def test_top10_suite_compares_two_models(labelled_folder):
    teacher, ta = ConstantLogits(5, winner=0), ConstantLogits(5, winner=3)
    cfg = {
        "num_workers": 0,
        "progress": False,
        "top10": {"root": str(labelled_folder), "image_size": 32, "other_model": ta, "k": 1},
    }
    result = SUITES.get("top10")(teacher, cfg, "cpu")
    assert result["accuracy"] == {"teacher": pytest.approx(20.0), "ta": pytest.approx(20.0)}
    table = pd.DataFrame(result["table"])
    classes = sorted(p.name for p in labelled_folder.iterdir())
    assert table[table.group == "teacher > ta"].class_name.unique().tolist() == [classes[0]]
    assert table[table.group == "ta > teacher"].class_name.unique().tolist() == [classes[3]]
    assert table[(table.group == "teacher > ta") & (table.model == "teacher")].correct.item() == 2
    assert result["protocol"]["eval_transform"]["resize"] == 36  # floor(32 / 0.875)
    with pytest.raises(ReproError, match="other_model"):
        SUITES.get("top10")(teacher, {"top10": {"root": str(labelled_folder)}}, "cpu")


def test_clean_suite_top1_top5(labelled_folder):
    cfg = {"num_workers": 0, "progress": False, "image_size": 32, "clean": {"root": str(labelled_folder)}}
    result = run_suites(ConstantLogits(5, winner=2), ["clean"], cfg, "cpu")["clean"]
    assert result["top1"] == pytest.approx(20.0) and result["top5"] == pytest.approx(100.0)
    assert result["n_images"] == 10 and result["protocol"]["label_space"] == "folder"
    with pytest.raises(ReproError, match="outputs"):
        SUITES.get("clean")(ConstantLogits(7, 0), cfg, "cpu")  # 5 folders cannot map onto 7 outputs


def test_clean_suite_maps_wnid_folders_to_imagenet_indices(tmp_path):
    # n01443537 is ImageNet class 1 and n02690373 (airliner) class 404: a 1000-way model predicting 404 is right on
    # exactly the airliner folder, which only holds if folders map to the standard indices, not to folder order.
    root = write_synthetic_imagefolder(tmp_path, ["n01443537", "n02690373"], per_class=2, size=32, splits=("val",))
    root = root / "val"
    cfg = {"num_workers": 0, "progress": False, "clean": {"root": str(root), "image_size": 32}}
    result = SUITES.get("clean")(ConstantLogits(1000, winner=404), cfg, "cpu")
    assert result["top1"] == pytest.approx(50.0) and result["protocol"]["label_space"] == "imagenet"


class TwoHeads(nn.Module):
    def forward(self, x: torch.Tensor):
        return x.mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 5), x.new_zeros(x.shape[0], 5)


def test_a_model_returning_a_tuple_is_refused(labelled_folder):
    cfg = {"num_workers": 0, "progress": False, "clean": {"root": str(labelled_folder), "image_size": 32}}
    with pytest.raises(ReproError, match="head"):
        SUITES.get("clean")(TwoHeads(), cfg, "cpu")


def test_registry_lists_the_suites_and_rejects_unknown_names():
    assert {"clean", "imagenet-c", "shape-bias", "top10"} <= set(SUITES.names())
    with pytest.raises(ReproError, match="shape-bias"):
        run_suites(ConstantLogits(5, 0), ["clean", "shapebias"], {}, "cpu")


def test_plot_top10_writes_a_png(tmp_path):
    correct = {"teacher": np.array([5, 9, 3, 7, 7]), "ta": np.array([5, 2, 8, 3, 3])}
    table = top10_table(correct, np.full(5, 10), ["c0", "c1", "c2", "c3", "c4"], k=3)
    path = plot_top10(table, tmp_path / "top10.png", stamp="tier=smoke commit=abc")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
