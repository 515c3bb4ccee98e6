"""The exact teacher-output cache: same distillation losses as the live teacher, hits skip it, keys separate files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from repro.data import ImageTensorDataset
from repro.data.loader import (TensorLoader, apply_views, identity_views, normalize, num_views, sample_views,
                               view_ids)
from repro.data.teacher_cache import TeacherCache, cached_teacher_fn, checkpoint_key, fill_cache
from repro.core.errors import ReproError
from repro.data.batch import Batch
from repro.methods import Distiller, TermContext, get_term
from tests.support import epoch_losses

NUM_IMAGES, NUM_CLASSES = 10, 7
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class CountingNet(nn.Module):
    """A tiny conv net that counts the images it has seen (the teacher's work)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, NUM_CLASSES))
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return 3.0 * self.body(x)  # larger logits make the losses sensitive to the teacher's values


@pytest.fixture
def dataset() -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=generator)
    return ImageTensorDataset(images=images, labels=labels, num_classes=NUM_CLASSES, name="tiny", fingerprint="d0")


def _open(cache_dir: Path, teacher_key: str = "teacher-a", fingerprint: str = "d0", dtype: str = "float32",
          normalization: tuple = (MEAN, STD)) -> TeacherCache:
    return TeacherCache.open(cache_dir, teacher_key=teacher_key, data_fingerprint=fingerprint,
                             normalization=normalization, num_images=NUM_IMAGES, num_classes=NUM_CLASSES,
                             dtype=dtype)


def _distiller(teacher: nn.Module, dataset: ImageTensorDataset, teacher_fn=None) -> Distiller:
    torch.manual_seed(1)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, NUM_CLASSES))
    ctx = TermContext(student=student, teacher=teacher, num_classes=NUM_CLASSES, train_labels=dataset.labels,
                      device=torch.device("cpu"), epochs=2)
    terms = {"kd": (0.9, get_term("kd")(ctx, temperature=4.0)), "wttm": (1.0, get_term("wttm")(ctx, gamma=0.2))}
    return Distiller(student, teacher, terms, teacher_fn=teacher_fn)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("float16", 5e-3)])
def test_cached_losses_equal_live_teacher_losses(tmp_path: Path, dataset: ImageTensorDataset, dtype: str,
                                                 rtol: float) -> None:
    teacher = CountingNet(seed=0)
    live = epoch_losses(_distiller(teacher, dataset), dataset, [1, 2, 1], MEAN, STD)
    cache = _open(tmp_path, dtype=dtype)
    cached_fn = cached_teacher_fn(cache, teacher, "cpu")
    cached = epoch_losses(_distiller(teacher, dataset, cached_fn), dataset, [1, 2, 1], MEAN, STD)
    assert len(live) == len(cached) == 9
    for a, b in zip(live, cached):
        assert a.keys() == b.keys() == {"kd", "wttm"}
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=rtol, abs=1e-6), (name, a[name], b[name])
    # Epoch 1 repeated: its views are the same, so the third pass is served entirely from the cache.
    assert cached_fn.hits >= NUM_IMAGES and cached_fn.misses + cached_fn.hits == 3 * NUM_IMAGES


def test_hits_skip_the_teacher_and_cold_equals_warm(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = CountingNet(seed=0)
    cache = _open(tmp_path, dtype="float16")
    loader = TensorLoader(dataset, 4, MEAN, STD, train=True, augment=True, seed=0, device="cpu")
    fn = cached_teacher_fn(cache, teacher, "cpu")
    cold = [fn(batch, False, False)[0] for batch in loader]
    assert teacher.images_seen == NUM_IMAGES and fn.misses == NUM_IMAGES and fn.hits == 0
    warm = [fn(batch, False, False)[0] for batch in loader]
    assert teacher.images_seen == NUM_IMAGES and fn.hits == NUM_IMAGES
    for a, b in zip(cold, warm):  # misses return the cache-rounded values too, so a run never sees the difference
        assert torch.equal(a, b) and a.dtype == torch.float32


def test_keys_select_different_files(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    base = _open(tmp_path).path
    assert _open(tmp_path).path == base
    assert TeacherCache.for_dataset(tmp_path, teacher_key="teacher-a", dataset=dataset, mean=MEAN, std=STD,
                                    dtype="float32").path == base
    others = {_open(tmp_path, teacher_key="teacher-b").path, _open(tmp_path, fingerprint="d1").path,
              _open(tmp_path, dtype="float16").path, _open(tmp_path, normalization=(MEAN, (0.2, 0.2, 0.2))).path}
    assert len(others) == 4 and base not in others
    sidecar = json.loads(base.with_suffix(".json").read_text())
    assert sidecar["teacher_key"] == "teacher-a" and sidecar["data_fingerprint"] == "d0"
    assert sidecar["num_views"] == 162 and sidecar["normalization"] == [list(MEAN), list(STD)]


def test_a_changed_teacher_never_reads_stale_entries(tmp_path: Path) -> None:
    indices, views = torch.arange(3), identity_views(3)
    first = _open(tmp_path, teacher_key="teacher-a")
    first.store(indices, views, torch.ones(3, NUM_CLASSES))
    _, hit = _open(tmp_path, teacher_key="teacher-b").lookup(indices, views)
    assert not hit.any()


def test_reopen_after_close_sees_partial_fill(tmp_path: Path) -> None:
    views = sample_views(4, torch.Generator().manual_seed(0))
    indices = torch.tensor([0, 3, 5, 9])
    logits = torch.randn(4, NUM_CLASSES)
    cache = _open(tmp_path)
    cache.store(indices[:2], views[:2], logits[:2])
    cache.close()
    reopened = _open(tmp_path)
    values, hit = reopened.lookup(indices, views)
    assert hit.tolist() == [True, True, False, False]
    assert torch.equal(values[:2], logits[:2]) and torch.equal(values[2:], torch.zeros(2, NUM_CLASSES))
    other_view = views.clone()
    other_view[:, 2] = 1 - other_view[:, 2]
    assert not reopened.lookup(indices, other_view)[1].any()  # same image, other view: a miss
    assert reopened.filled_fraction() == pytest.approx(2 / (NUM_IMAGES * num_views()))


def test_two_handles_share_entries(tmp_path: Path) -> None:
    writer, reader = _open(tmp_path), _open(tmp_path)
    writer.store(torch.tensor([1]), None, torch.full((1, NUM_CLASSES), 2.5))
    values, hit = reader.lookup(torch.tensor([1]), identity_views(1))  # None means the unaugmented view
    assert hit.item() and torch.equal(values, torch.full((1, NUM_CLASSES), 2.5))


def test_float16_overflow_is_not_stored(tmp_path: Path) -> None:
    cache = _open(tmp_path, dtype="float16")
    logits = torch.zeros(2, NUM_CLASSES)
    logits[1, 0] = 1e6
    cache.store(torch.tensor([0, 1]), None, logits)
    assert cache.filled(torch.tensor([0, 1]), None).tolist() == [True, False]
    assert torch.equal(cache.round(logits)[1], logits[1])


def test_a_batch_whose_every_row_overflows_stores_nothing_and_does_not_fail(tmp_path: Path) -> None:
    # Seen in the smoke reproduction: a diverging smoke teacher whose every missed row overflows float16.
    cache = _open(tmp_path, dtype="float16")
    logits = torch.full((2, NUM_CLASSES), 1e6)
    cache.store(torch.tensor([0, 1]), None, logits)
    assert cache.filled(torch.tensor([0, 1]), None).tolist() == [False, False]


def test_fill_cache_holds_every_view_exactly(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = CountingNet(seed=4)
    cache = _open(tmp_path)
    assert fill_cache(cache, teacher, dataset, MEAN, STD, "cpu", batch_size=256) == NUM_IMAGES * num_views()
    assert cache.filled_fraction() == 1.0
    seen = teacher.images_seen
    assert fill_cache(cache, teacher, dataset, MEAN, STD, "cpu") == 0 and teacher.images_seen == seen
    views = sample_views(NUM_IMAGES, torch.Generator().manual_seed(8))
    indices = torch.arange(NUM_IMAGES)
    values, hit = cache.lookup(indices, views)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = teacher.eval()(normalize(apply_views(dataset.images, views), mean, std))
    assert hit.all() and torch.allclose(values, expected, rtol=1e-5, atol=1e-5)


def test_fill_cache_refuses_other_data(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    with pytest.raises(ReproError, match="other data"):
        fill_cache(_open(tmp_path, fingerprint="d1"), CountingNet(0), dataset, MEAN, STD, "cpu")


def test_feature_requests_and_bad_files_are_repro_errors(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    cache = _open(tmp_path)
    fn = cached_teacher_fn(cache, CountingNet(0), "cpu")
    batch = Batch(images=torch.zeros(1, 3, 32, 32), targets=torch.zeros(1, dtype=torch.long),
                  labels=torch.zeros(1, dtype=torch.long), indices=torch.zeros(1, dtype=torch.long), epoch=1)
    with pytest.raises(ReproError, match="logits only"):
        fn(batch, True, False)
    sidecar = cache.path.with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace("teacher-a", "teacher-z"))
    with pytest.raises(ReproError, match="sidecar"):
        _open(tmp_path)
    with pytest.raises(ReproError, match="dtype"):
        _open(tmp_path, dtype="bfloat16")
    with pytest.raises(ReproError, match="not found"):
        checkpoint_key(tmp_path / "missing.pth")
    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"weights")
    assert checkpoint_key(checkpoint) != checkpoint_key(checkpoint, extra="amp")
    assert np.dtype(cache.dtype) == np.float32


def _flag_without_logits(cache: TeacherCache, index: int, views: torch.Tensor) -> None:
    """What a reader on another node can see over NFS: the entry's flag, but not (yet) its logits."""
    ids = view_ids(views).numpy()
    flags = np.memmap(cache.path, dtype=np.uint8, mode="r+", shape=(NUM_IMAGES, num_views()))
    flags[index, ids[0]] = 1
    flags.flush()


def test_a_flag_without_its_logits_is_a_miss_not_a_uniform_teacher(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = CountingNet(seed=2)
    cache = _open(tmp_path, dtype="float16")
    loader = TensorLoader(dataset, NUM_IMAGES, MEAN, STD, train=True, augment=True, seed=1, device="cpu")
    batch = next(iter(loader))
    _flag_without_logits(cache, int(batch.indices[0]), batch.views[:1])
    reader = _open(tmp_path, dtype="float16")  # a second handle: another process reading the same file
    assert not reader.filled(batch.indices[:1], batch.views[:1]).any()
    fn = cached_teacher_fn(reader, teacher, "cpu")
    logits, _ = fn(batch, False, False)
    with torch.no_grad():
        live = teacher.eval()(batch.images).float()
    assert fn.misses == NUM_IMAGES and fn.hits == 0  # the flagged entry was recomputed by the live teacher
    torch.testing.assert_close(logits, reader.round(live), rtol=0, atol=0)
    assert logits[0].abs().sum() > 0  # never served as zeros
    assert reader.filled(batch.indices, batch.views).all()  # and written again, now with its checksum


def test_a_torn_entry_is_a_miss(tmp_path: Path) -> None:
    cache = _open(tmp_path)
    logits = torch.randn(2, NUM_CLASSES)
    cache.store(torch.tensor([3, 4]), None, logits)
    assert cache.lookup(torch.tensor([3, 4]), None)[1].tolist() == [True, True]
    # Half of entry 3's logits from an older state of the file (a torn write seen by another node).
    raw = np.memmap(cache.path, dtype=np.float32, mode="r+", offset=TeacherCache._logits_offset(cache.keys),
                    shape=(NUM_IMAGES, num_views(), NUM_CLASSES))
    centre = int(view_ids(identity_views(1))[0])
    raw[3, centre, : NUM_CLASSES // 2] = 0.0
    raw.flush()
    values, hit = _open(tmp_path).lookup(torch.tensor([3, 4]), None)
    assert hit.tolist() == [False, True]
    assert torch.equal(values[0], torch.zeros(NUM_CLASSES)) and torch.equal(values[1], logits[1])


def test_read_only_jobs_compute_misses_live_without_writing(tmp_path: Path, dataset: ImageTensorDataset) -> None:
    teacher = CountingNet(seed=3)
    writer = _open(tmp_path)
    fill_cache(writer, teacher, dataset, MEAN, STD, "cpu")
    writer.close()
    reader = TeacherCache.open(tmp_path, teacher_key="teacher-a", data_fingerprint="d0", normalization=(MEAN, STD),
                               num_images=NUM_IMAGES, num_classes=NUM_CLASSES, dtype="float32", readonly=True)
    _corrupt_checksum(reader, 0)
    loader = TensorLoader(dataset, NUM_IMAGES, MEAN, STD, train=False, augment=False, seed=0, device="cpu")
    batch = next(iter(loader))
    fn = cached_teacher_fn(reader, teacher, "cpu")
    before = teacher.images_seen
    logits, _ = fn(batch, False, False)
    assert fn.misses == 1 and teacher.images_seen == before + 1  # the bad entry only, computed live
    with torch.no_grad():
        torch.testing.assert_close(logits[:1], teacher.eval()(batch.images[:1]).float(), rtol=1e-5, atol=1e-5)


def _corrupt_checksum(cache: TeacherCache, index: int) -> None:
    sums = np.memmap(cache.path, dtype=np.uint32, mode="r+", offset=TeacherCache._checksums_offset(cache.keys),
                     shape=(NUM_IMAGES, num_views()))
    sums[index, int(view_ids(identity_views(1))[0])] ^= 1
    sums.flush()
