"""ImageNet-C: the mCE arithmetic (hand-computed), name-keyed AlexNet constants, the folder checks, the synthetic
writer (real imagecorruptions functions, JPEG layout) and the suite end to end."""
from __future__ import annotations

import os
import random
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from repro.data.imagenet_c_synthetic import corrupt_image, write_synthetic_imagenet_c
from repro.core.errors import ReproError
from repro.analyses import SUITES
from repro.analyses.imagenet_c import (
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    alexnet_errors,
    check_imagenet_c_layout,
    mce_from_errors,
)
from repro.harness.render.analysis_plots import plot_imagenet_c
from tests.support import ConstantLogits

# Typed from ssta.md section 4 / the brief, by name, independently of the data file.
ALEXNET = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip
SMOKE = ("gaussian_noise", "contrast")


def grid(errors_by_corruption: dict[str, list[float]]) -> dict[tuple[str, int], float]:
    return {(c, s): e for c, values in errors_by_corruption.items() for s, e in zip(range(1, 6), values)}


def test_alexnet_constants_are_keyed_by_name():
    assert alexnet_errors() == ALEXNET
    assert set(BENCHMARK_CORRUPTIONS) == set(ALEXNET) and len(BENCHMARK_CORRUPTIONS) == 15
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def test_mce_hand_computed_with_keys_out_of_order():
    errors = grid({"brightness": [0.1, 0.2, 0.3, 0.2, 0.2], "gaussian_noise": [0.5, 0.6, 0.7, 0.8, 0.9]})
    shuffled = dict(sorted(errors.items(), key=lambda kv: -kv[0][1]))  # severities 5..1, brightness first
    result = mce_from_errors(shuffled, corruptions=("gaussian_noise", "brightness"))
    # CE_gauss = 100 * 0.7 / 0.886428, CE_bright = 100 * 0.2 / 0.564592
    assert result["ce"]["gaussian_noise"] == pytest.approx(78.9686246373084)
    assert result["ce"]["brightness"] == pytest.approx(35.42381046844447)
    assert result["mce"] == pytest.approx(57.19621755287643)
    assert result["mean_error"] == pytest.approx(45.0)
    assert result["mean_accuracy"] == pytest.approx(55.0)
    assert result["error"]["gaussian_noise"] == pytest.approx(70.0)
    assert result["complete_benchmark"] is False


def test_full_benchmark_in_any_order_gives_the_same_name_keyed_ce():
    rng = random.Random(0)
    mean_error = {c: 0.3 + 0.02 * i for i, c in enumerate(sorted(ALEXNET))}
    errors = grid({c: [e] * 5 for c, e in mean_error.items()})
    items = list(errors.items())
    rng.shuffle(items)
    forward = mce_from_errors(dict(items))
    backward = mce_from_errors(dict(items), corruptions=tuple(reversed(BENCHMARK_CORRUPTIONS)))
    for c in ALEXNET:
        assert forward["ce"][c] == pytest.approx(100 * mean_error[c] / ALEXNET[c])
        assert backward["ce"][c] == pytest.approx(forward["ce"][c])
    expected = sum(100 * mean_error[c] / ALEXNET[c] for c in ALEXNET) / 15
    assert forward["mce"] == pytest.approx(expected) and backward["mce"] == pytest.approx(expected)
    assert forward["complete_benchmark"] is True


def test_extra_corruptions_are_reported_apart():
    errors = grid({"fog": [0.4] * 5, "spatter": [0.9] * 5})
    with_extra = mce_from_errors(errors, corruptions=("fog",), extra_corruptions=("spatter",))
    without = mce_from_errors(errors, corruptions=("fog",))
    assert with_extra["mce"] == pytest.approx(without["mce"]) == pytest.approx(40 / 0.819324)
    assert "spatter" not in with_extra["ce"]
    assert with_extra["error"]["spatter"] == pytest.approx(90.0)
    assert with_extra["extra_mean_error"] == pytest.approx(90.0) and without["extra_mean_error"] is None
    assert with_extra["mean_error"] == pytest.approx(40.0)


def test_missing_corruption_or_severity_is_named():
    errors = grid({"gaussian_noise": [0.5] * 5})
    with pytest.raises(ReproError, match="shot_noise"):
        mce_from_errors(errors, corruptions=("gaussian_noise", "shot_noise"))
    with pytest.raises(ReproError, match="shot_noise"):
        mce_from_errors(errors)  # the default asks for all 15
    del errors[("gaussian_noise", 3)]
    with pytest.raises(ReproError, match=r"\('gaussian_noise', 3\)"):
        mce_from_errors(errors, corruptions=("gaussian_noise",))


def test_bad_names_and_values_are_refused():
    with pytest.raises(ReproError, match="gausian_noise"):
        mce_from_errors(grid({"gausian_noise": [0.5] * 5}), corruptions=("gausian_noise",))
    with pytest.raises(ReproError, match=r"\[0, 1\]"):
        mce_from_errors(grid({"fog": [50.0] * 5}), corruptions=("fog",))  # percent instead of fraction


# --------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def imagenet_c_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_c")
    return write_synthetic_imagenet_c(root, corruptions=SMOKE, num_classes=2, images_per_class=2, image_size=32)


def test_synthetic_writer_uses_the_released_layout(imagenet_c_root, tmp_path):
    for corruption in SMOKE:
        for severity in range(1, 6):
            classes = sorted(p.name for p in (imagenet_c_root / corruption / str(severity)).iterdir())
            assert classes == ["n01440764", "n01443537"]
            files = sorted((imagenet_c_root / corruption / str(severity) / classes[0]).iterdir())
            assert [f.suffix for f in files] == [".JPEG", ".JPEG"]
            assert Image.open(files[0]).format == "JPEG" and Image.open(files[0]).size == (32, 32)
    again = write_synthetic_imagenet_c(tmp_path, corruptions=("gaussian_noise",), num_classes=2, images_per_class=2)
    name = "gaussian_noise/4/n01440764/n01440764_00001.JPEG"
    assert (again / name).read_bytes() == (imagenet_c_root / name).read_bytes()  # seeded, reproducible


def test_corruptions_are_the_real_functions():
    yy, xx = np.mgrid[0:48, 0:48]
    clean = np.stack([4 * xx, 4 * yy, np.full_like(xx, 128)], axis=-1).astype(float)  # a smooth colour ramp
    change = [np.abs(corrupt_image(clean.astype(np.uint8), "gaussian_noise", s, seed=1) - clean).mean() for s in (1, 5)]
    assert 0 < change[0] < change[1]  # noise strength grows with severity
    for name in ("frost", "fog", "impulse_noise", "glass_blur", "gaussian_blur"):  # need the compat shims
        a = corrupt_image(clean.astype(np.uint8), name, 3, seed=7)
        assert a.shape == (48, 48, 3) and a.dtype == np.uint8
        assert np.array_equal(a, corrupt_image(clean.astype(np.uint8), name, 3, seed=7))


def test_layout_check_names_missing_and_partial_cells(imagenet_c_root, tmp_path):
    cells = check_imagenet_c_layout(imagenet_c_root, SMOKE)
    assert sorted(cells) == [(c, s) for c in sorted(SMOKE) for s in range(1, 6)]
    broken = tmp_path / "broken"
    shutil.copytree(imagenet_c_root, broken)
    shutil.rmtree(broken / "contrast" / "4")
    shutil.rmtree(broken / "gaussian_noise" / "2" / "n01443537")
    with pytest.raises(ReproError) as err:
        check_imagenet_c_layout(broken, (*SMOKE, "fog"))
    message = str(err.value)
    assert "contrast/4/ is missing" in message
    assert "gaussian_noise/2/ lacks 1 class folder" in message and "n01443537" in message
    assert "fog/ is missing" in message


def test_suite_end_to_end_with_a_constant_model(imagenet_c_root):
    model = ConstantLogits(num_classes=2, winner=0)  # right on exactly half of every balanced cell
    cfg = {
        "num_workers": 0,
        "imagenet-c": {"root": str(imagenet_c_root), "corruptions": list(SMOKE), "image_size": 32, "progress": False},
    }
    result = SUITES.get("imagenet-c")(model, cfg, "cpu")
    assert result["error"] == {"gaussian_noise": pytest.approx(50.0), "contrast": pytest.approx(50.0)}
    assert result["ce"]["contrast"] == pytest.approx(50 / 0.853204)
    assert result["mce"] == pytest.approx((50 / 0.886428 + 50 / 0.853204) / 2)
    assert result["complete_benchmark"] is False
    assert result["n_images"]["contrast/5"] == 4
    protocol = result["protocol"]
    assert protocol["benchmark_corruptions"] == list(SMOKE) and protocol["extra_corruptions_reported_apart"] == []
    assert "JPEG on disk" in protocol["source"]
    assert protocol["eval_transform"]["center_crop"] == 32 and protocol["eval_transform"]["resize"] is None
    assert protocol["label_space"] == ["folder"]


def test_suite_refuses_unknown_options_and_missing_root(imagenet_c_root):
    model = ConstantLogits(2, 0)
    with pytest.raises(ReproError, match="corruption_list"):
        SUITES.get("imagenet-c")(model, {"imagenet-c": {"root": str(imagenet_c_root), "corruption_list": []}}, "cpu")
    with pytest.raises(ReproError, match="root"):
        SUITES.get("imagenet-c")(model, {}, "cpu")


def test_plot_imagenet_c_writes_a_png(tmp_path):
    results = {"deit_tiny": {"fog": 60.0, "contrast": 70.0, "spatter": 40.0}, "ssta": {"fog": 55.0, "contrast": 66.0}}
    path = plot_imagenet_c(results, tmp_path / "c.png", stamp="tier=smoke commit=abc")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
