"""ImageNet-style folders: the synthetic writer, the reader's errors and the two Batch pipelines."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from repro.core.errors import ReproError
from repro.data.imagefolder import load_imagefolder, load_imagefolder_splits, write_synthetic_imagefolder
from repro.data.pipelines_folder import build_folder_pipeline
from repro.data.batch import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 12, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return write_synthetic_imagefolder(root, classes=CLASSES, per_class=PER_CLASS, size=36, seed=0,
                                       val_per_class=VAL_PER_CLASS)


def _digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.JPEG")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_synthetic_folder_layout_and_determinism(folder, tmp_path):
    train = sorted((folder / "train").iterdir())
    assert [p.name for p in train] == [f"n{k:08d}" for k in range(CLASSES)]
    assert all(len(list(p.glob("*.JPEG"))) == PER_CLASS for p in train)
    assert all(len(list(p.glob("*.JPEG"))) == VAL_PER_CLASS for p in (folder / "val").iterdir())
    with Image.open(next(train[0].glob("*.JPEG"))) as image:
        assert image.format == "JPEG" and image.size == (36, 36)
    again = write_synthetic_imagefolder(tmp_path / "again", classes=CLASSES, per_class=PER_CLASS, size=36, seed=0,
                                        val_per_class=VAL_PER_CLASS)
    other = write_synthetic_imagefolder(tmp_path / "other", classes=CLASSES, per_class=PER_CLASS, size=36, seed=1,
                                        val_per_class=VAL_PER_CLASS)
    assert _digest(again) == _digest(folder) != _digest(other)


def test_synthetic_classes_are_learnable(folder):
    def pixels(split):
        data = load_imagefolder(folder, split)
        features = np.stack([np.asarray(data[i][0], dtype=np.float32).reshape(-1, 3).mean(0) for i in range(len(data))])
        return features, np.array(data.targets)

    train_x, train_y = pixels("train")
    val_x, val_y = pixels("val")
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(CLASSES)])
    predicted = ((val_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == val_y).mean() >= 0.9  # even the mean colour alone separates the classes


def test_missing_or_empty_folders_are_clear_errors(tmp_path, folder):
    with pytest.raises(ReproError, match="folder not found"):
        load_imagefolder(tmp_path / "nowhere", "train")
    (tmp_path / "partial" / "train" / "n0").mkdir(parents=True)
    with pytest.raises(ReproError, match="val is missing"):
        load_imagefolder_splits(tmp_path / "partial")
    with pytest.raises(ReproError, match="no usable images"):
        load_imagefolder(tmp_path / "partial", "train")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(ReproError, match="no usable images"):
        load_imagefolder(tmp_path / "empty", "val")
    mismatch = write_synthetic_imagefolder(tmp_path / "mismatch", classes=3, per_class=1, size=8, splits=("train",))
    write_synthetic_imagefolder(mismatch, classes=["a", "b"], per_class=1, size=8, splits=("val",))
    with pytest.raises(ReproError, match="different class folders"):
        load_imagefolder_splits(mismatch)
    with pytest.raises(ReproError, match="unknown image-folder pipeline"):
        build_folder_pipeline("autoaug", folder, 32, 8, 0, "cpu")


def test_deit_pipeline_yields_soft_targets(folder):
    train, test, labels, classes, fingerprint = build_folder_pipeline("deit", folder, 32, 8, seed=0, device="cpu")
    assert classes == CLASSES and labels.shape == (CLASSES * PER_CLASS,)
    train.set_epoch(2)
    batches = list(train)
    assert len(batches) == len(train) == (CLASSES * PER_CLASS) // 8  # one process: ~1/3 of the images, x3
    batch = batches[0]
    assert isinstance(batch, Batch) and batch.epoch == 2
    assert batch.images.shape == (8, 3, 32, 32) and batch.targets.shape == (8, CLASSES)
    assert batch.targets.dtype == torch.float32 and batch.labels.dtype == torch.long
    torch.testing.assert_close(batch.targets.sum(dim=1), torch.ones(8))
    torch.testing.assert_close(batch.labels, labels[batch.indices])
    assert batch.targets.max() < 1.0  # smoothing and mixing: never one-hot
    counts = torch.bincount(torch.cat([b.indices for b in batches]))
    assert counts.max() == 3  # repeated augmentation: three copies of each drawn image
    evaluation = list(test)
    assert test.num_samples == CLASSES * VAL_PER_CLASS and train.num_samples == CLASSES * PER_CLASS
    assert sum(b.images.shape[0] for b in evaluation) == CLASSES * VAL_PER_CLASS
    assert evaluation[0].images.shape[1:] == (3, 32, 32) and evaluation[0].targets.ndim == 1
    torch.testing.assert_close(torch.cat([b.indices for b in evaluation]), torch.arange(CLASSES * VAL_PER_CLASS))


def test_standard_pipeline_order_and_fingerprint(folder):
    first = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=0, device="cpu")
    second = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=0, device="cpu")
    other_seed = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=1, device="cpu")
    smoothed = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=0, device="cpu", smoothing=0.1)

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([b.indices for b in loader]).tolist()

    assert order(first[0], 1) == order(second[0], 1) != order(first[0], 2)
    assert order(first[0], 1) != order(other_seed[0], 1)
    assert sorted(order(first[0], 1)) == list(range(CLASSES * PER_CLASS))
    batch = next(iter(first[0]))
    assert batch.targets.ndim == 1 and torch.equal(batch.targets, batch.labels)
    assert next(iter(first[1])).images.shape == (8, 3, 32, 32)
    soft = next(iter(smoothed[0])).targets
    assert soft.shape == (8, CLASSES) and soft.max().item() == pytest.approx(0.9 + 0.1 / CLASSES)
    assert first[4] == second[4] == other_seed[4] != smoothed[4]
    with pytest.raises(ReproError, match="unknown options"):
        build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=0, device="cpu", mixup=0.8)
    with pytest.raises(ReproError, match="even batch size"):
        build_folder_pipeline("deit", folder, 32, 7, seed=0, device="cpu")


def test_standard_pipeline_trains_on_the_short_last_batch(folder):
    """torchdistill's ImageNet loaders keep the last, partial batch (drop_last: False); DeiT's drops it."""
    n = CLASSES * PER_CLASS  # 48 images, batch 10: four full batches and one of 8
    train = build_folder_pipeline("imagenet_standard", folder, 32, 10, seed=0, device="cpu")[0]
    train.set_epoch(1)
    sizes = [b.labels.numel() for b in train]
    assert sizes == [10, 10, 10, 10, n % 10] and len(train) == 5
    assert sorted(torch.cat([b.indices for b in train]).tolist()) == list(range(n))  # every image once
    dropping = build_folder_pipeline("imagenet_standard", folder, 32, 10, seed=0, device="cpu", drop_last=True)[0]
    assert [b.labels.numel() for b in dropping] == [10] * 4
    deit = build_folder_pipeline("deit", folder, 32, 10, seed=0, device="cpu", repeated_aug=1)[0]
    assert len(deit) == n // 10
    with pytest.raises(ReproError, match="drop_last must stay true"):
        build_folder_pipeline("deit", folder, 32, 10, seed=0, device="cpu", drop_last=False)


def _epoch_images(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.indices.clone(), b.images.clone()) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))


def test_persistent_workers_give_each_epoch_the_same_batches_as_fresh_ones_and_a_resume(folder):
    persistent = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=3, device="cpu", workers=2)[0]
    assert persistent.loader.persistent_workers
    epochs = {e: _epoch_images(persistent, e) for e in (1, 2, 3)}
    assert not _same(epochs[1], epochs[2])  # a new order and new crops each epoch
    resumed = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=3, device="cpu", workers=2)[0]
    assert _same(_epoch_images(resumed, 2), epochs[2])  # fresh workers, started at epoch 2 (a resume)
    in_process = build_folder_pipeline("imagenet_standard", folder, 32, 8, seed=3, device="cpu", workers=0)[0]
    rng = torch.get_rng_state()
    assert _same(_epoch_images(in_process, 3), epochs[3])  # and without workers at all
    assert torch.equal(torch.get_rng_state(), rng)  # the process's own RNG stream is left as it was
