"""CIFAR readers on the official pickle layout, and the synthetic data written in that layout."""
from __future__ import annotations

import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets import CIFAR10, CIFAR100

import repro.data.cifar as cifar
from repro.core.io import file_digests
from repro.data import ImageTensorDataset, dataset_names, load_dataset
from repro.data.cifar import SYNTHETIC_MANIFEST, read_cifar
from repro.data.synthetic import (SMOKE_ARGS, classes_with_images, ensure_synthetic_cifar, read_synthetic_cifar,
                                  write_synthetic_cifar)
from repro.core.errors import ReproError

SMALL = dict(num_classes=100, classes_used=5, train_per_class=4, test_per_class=2, seed=1)


@pytest.fixture
def synthetic100(tmp_path: Path) -> Path:
    write_synthetic_cifar(tmp_path, **SMALL)
    return tmp_path


def _patch_official_md5(monkeypatch: pytest.MonkeyPatch, source: type, folder: Path) -> None:
    """Make torchvision's md5 list describe the files in ``folder`` (so the strict reader accepts them)."""
    md5 = lambda name: file_digests(folder / name, "md5")["md5"]  # noqa: E731
    monkeypatch.setattr(source, "train_list", [[n, md5(n)] for n, _ in source.train_list])
    monkeypatch.setattr(source, "test_list", [[n, md5(n)] for n, _ in source.test_list])
    monkeypatch.setattr(source, "meta", {**source.meta, "md5": md5(source.meta["filename"])})


def test_synthetic_cifar100_reads_back_with_its_labels(synthetic100: Path) -> None:
    train = read_synthetic_cifar(synthetic100, "train")
    test = read_synthetic_cifar(synthetic100, "test")
    assert isinstance(train, ImageTensorDataset)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10, 3, 32, 32)
    assert train.num_classes == 100 and train.name == "synthetic_cifar100"
    used = classes_with_images(100, 5)
    assert used == [0, 20, 40, 60, 80]
    assert sorted(train.labels.tolist()) == sorted(used * 4)
    assert train.fingerprint != test.fingerprint


def test_synthetic_layout_is_the_one_torchvision_reads(synthetic100: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = synthetic100 / "cifar-100-python"
    with open(folder / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    assert set(raw) >= {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (20, 3072)
    # torchvision's own reader (integrity check bypassed: the md5s are those of the real files) sees the same
    # pixels and labels, so the CHW interpretation of the 3072-byte rows is the official one.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = CIFAR100(str(synthetic100), train=True, download=False)
    ours = read_synthetic_cifar(synthetic100, "train")
    assert torch.equal(ours.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert ours.labels.tolist() == reference.targets
    assert len(reference.classes) == 100


def test_synthetic_cifar10_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_synthetic_cifar(tmp_path, num_classes=10, classes_used=10, train_per_class=2, test_per_class=1,
                                   seed=3, variant="cifar10")
    names = {p.name for p in folder.iterdir()}
    assert {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta", SYNTHETIC_MANIFEST} <= names
    train = read_synthetic_cifar(tmp_path, "train", "cifar10")
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = CIFAR10(str(tmp_path), train=True, download=False)
    assert torch.equal(train.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert train.labels.tolist() == reference.targets


def test_generator_is_deterministic_and_seeded(tmp_path: Path) -> None:
    first = write_synthetic_cifar(tmp_path / "a", **SMALL)
    second = write_synthetic_cifar(tmp_path / "b", **SMALL)
    other = write_synthetic_cifar(tmp_path / "c", **{**SMALL, "seed": 2})
    for name in ("train", "test", "meta", SYNTHETIC_MANIFEST):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "train").read_bytes() != (other / "train").read_bytes()


def test_ensure_writes_only_when_missing_or_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ensure_synthetic_cifar(tmp_path, **SMALL)
    before = (folder / "train").read_bytes()

    def must_not_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("rewrote matching synthetic data")

    with monkeypatch.context() as patch:
        patch.setattr("repro.data.synthetic.write_synthetic_cifar", must_not_write)
        assert ensure_synthetic_cifar(tmp_path, **SMALL) == folder
    (folder / "train").write_bytes(b"tampered")
    ensure_synthetic_cifar(tmp_path, **SMALL)  # a damaged file is regenerated
    assert (folder / "train").read_bytes() == before
    ensure_synthetic_cifar(tmp_path, **{**SMALL, "train_per_class": 3})  # other arguments: rewritten
    assert read_synthetic_cifar(tmp_path, "train").images.shape[0] == 15


def test_ensure_refuses_to_overwrite_real_looking_data(synthetic100: Path) -> None:
    (synthetic100 / "cifar-100-python" / SYNTHETIC_MANIFEST).unlink()
    with pytest.raises(ReproError, match="must not overwrite"):
        ensure_synthetic_cifar(synthetic100, **{**SMALL, "seed": 9})


def test_a_concurrent_writer_never_takes_half_written_synthetic_data_for_real_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two smoke workers starting together: the second looks while the first has written only some files.

    It must see the manifest (written first), write the files itself and read the same bytes; before the manifest
    came first it refused the folder as real data (CI, test_two_repro_runs_on_one_spec_train_every_run_exactly_once).
    """
    import repro.data.synthetic as synthetic

    real_write = synthetic.atomic_write_bytes
    seen: list[int] = []

    def write_then_let_the_other_worker_look(path: Path, data: bytes) -> None:
        real_write(path, data)
        if Path(path).name != SYNTHETIC_MANIFEST and not seen:
            seen.append(1)
            ensure_synthetic_cifar(tmp_path, **SMALL)  # the second worker, mid-way through the first one's write

    monkeypatch.setattr(synthetic, "atomic_write_bytes", write_then_let_the_other_worker_look)
    ensure_synthetic_cifar(tmp_path, **SMALL)
    assert seen
    monkeypatch.undo()
    reference = tmp_path / "reference"
    write_synthetic_cifar(reference, **SMALL)
    for split in ("train", "test"):
        assert torch.equal(read_synthetic_cifar(tmp_path, split).images, read_synthetic_cifar(reference, split).images)


def test_manifest_pins_the_synthetic_files(synthetic100: Path) -> None:
    folder = synthetic100 / "cifar-100-python"
    data = (folder / "test").read_bytes()
    (folder / "test").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ReproError, match="sha256"):
        read_synthetic_cifar(synthetic100, "test")


def test_strict_reader_rejects_synthetic_and_bad_md5(synthetic100: Path) -> None:
    folder = synthetic100 / "cifar-100-python"
    with pytest.raises(ReproError, match="synthetic smoke data"):
        read_cifar(synthetic100, "train", "cifar100", download=False)
    (folder / SYNTHETIC_MANIFEST).unlink()
    with pytest.raises(ReproError) as err:
        read_cifar(synthetic100, "train", "cifar100", download=False)
    message = str(err.value)
    assert str(folder) in message and "md5" in message and "TIER=smoke" in message


def test_strict_reader_accepts_files_matching_the_official_md5(synthetic100: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = synthetic100 / "cifar-100-python"
    (folder / SYNTHETIC_MANIFEST).unlink()
    _patch_official_md5(monkeypatch, CIFAR100, folder)
    dataset = load_dataset("cifar100", synthetic100, "test", download=False)
    assert dataset.name == "cifar100" and dataset.images.shape == (10, 3, 32, 32)
    assert dataset.fingerprint == load_dataset("cifar100", synthetic100, "test", download=False).fingerprint


def test_missing_data_without_download_names_folder_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ReproError) as err:
        load_dataset("cifar100", tmp_path, "train", download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "missing train, meta" in message and "TIER=smoke" in message and "cifar-100-python.tar.gz" in message


def test_failed_download_is_one_repro_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(ReproError, match="download failed.*no network"):
        load_dataset("cifar10", tmp_path, "test", download=True)


def test_download_uses_torchvision_url_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = write_synthetic_cifar(tmp_path / "staging", **SMALL)
    (staging / SYNTHETIC_MANIFEST).unlink()
    _patch_official_md5(monkeypatch, CIFAR100, staging)
    calls = []

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        shutil.copytree(staging, Path(download_root) / "cifar-100-python")

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    dataset = load_dataset("cifar100", tmp_path / "data", "train", download=True)
    assert calls == [(CIFAR100.url, CIFAR100.filename, CIFAR100.tgz_md5)]
    assert dataset.images.shape == (20, 3, 32, 32)


def test_registry_and_smoke_reader(tmp_path: Path) -> None:
    assert {"cifar10", "cifar100", "synthetic_cifar10", "synthetic_cifar100"} <= set(dataset_names())
    with pytest.raises(ReproError, match="unknown dataset"):
        load_dataset("cifar1000", tmp_path, "train")
    with pytest.raises(ReproError, match="unknown split"):
        load_dataset("cifar100", tmp_path, "validation")
    test = load_dataset("synthetic_cifar100", tmp_path, "test", download=False)
    args = SMOKE_ARGS["cifar100"]
    assert len(test) == args["classes_used"] * args["test_per_class"] and test.num_classes == 100


def test_synthetic_data_is_learnable_by_a_tiny_cnn(tmp_path: Path) -> None:
    """A 2-layer CNN trained for a few seconds is far above chance (1/10): the smoke tier can learn."""
    write_synthetic_cifar(tmp_path, num_classes=100, classes_used=10, train_per_class=60, test_per_class=30, seed=0)
    train, test = read_synthetic_cifar(tmp_path, "train"), read_synthetic_cifar(tmp_path, "test")
    prep = lambda images: (images.float() / 255 - 0.5) / 0.25  # noqa: E731
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs = prep(train.images)
    for _ in range(6):
        for lo in range(0, len(train), 50):
            loss = nn.functional.cross_entropy(model(inputs[lo:lo + 50]), train.labels[lo:lo + 50])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(prep(test.images)).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.3, accuracy
