"""The device-resident loader: torchvision-exact batched augmentation, its distribution, determinism, coverage."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from scipy.stats import chisquare

from repro.data import ImageTensorDataset
from repro.data.batch import Batch, epoch_generator
from repro.data.loader import (TensorLoader, apply_views, normalize, num_views, sample_views,
                               view_ids, views_from_ids)
from repro.core.errors import ReproError

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


def _dataset(count: int = 50, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return ImageTensorDataset(images=images, labels=labels, num_classes=10, name="random", fingerprint="x")


def _torchvision_view(image: torch.Tensor, dy: int, dx: int, flip: int) -> torch.Tensor:
    """What RandomCrop(32, padding=4) + RandomHorizontalFlip() produce for crop corner (dy, dx) and flip."""
    out = TF.crop(TF.pad(image, [4], fill=0), dy, dx, 32, 32)
    return TF.hflip(out) if flip else out


def _all_views() -> torch.Tensor:
    return views_from_ids(torch.arange(num_views()))


def test_every_view_matches_torchvision_on_tensors() -> None:
    images = _dataset(4).images
    views = _all_views()
    for image in images:
        batch = apply_views(image.expand(len(views), -1, -1, -1), views)
        expected = torch.stack([_torchvision_view(image, *map(int, v)) for v in views])
        assert torch.equal(batch, expected)


def test_views_match_torchvision_on_pil_images() -> None:
    images = _dataset(6).images
    views = sample_views(6, torch.Generator().manual_seed(1))
    batch = apply_views(images, views)
    for image, view, ours in zip(images, views, batch):
        dy, dx, flip = map(int, view)
        pil = TF.crop(TF.pad(TF.to_pil_image(image), [4], fill=0), dy, dx, 32, 32)
        pil = TF.hflip(pil) if flip else pil
        assert torch.equal(ours, TF.pil_to_tensor(pil))


def test_view_space_is_torchvisions_random_crop_range() -> None:
    # RandomCrop(32, padding=4) draws its corner from the 40x40 padded image: 0..8 on each axis, like ours.
    torch.manual_seed(0)
    padded = torch.zeros(3, 40, 40)
    corners = {T.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(3000)}
    assert corners == {(dy, dx) for dy in range(9) for dx in range(9)}
    assert num_views() == 162


def test_view_sampler_is_uniform_over_81_offsets_and_2_flips() -> None:
    draws = sample_views(162 * 400, torch.Generator().manual_seed(123))
    assert int(draws[:, :2].min()) == 0 and int(draws[:, :2].max()) == 8
    assert set(draws[:, 2].tolist()) == {0, 1}
    counts = torch.bincount(view_ids(draws), minlength=162)
    assert counts.numel() == 162 and bool((counts > 0).all())
    # Fixed seed, so this cannot flake; it fails for a sampler that favours some views (e.g. 0..7 offsets).
    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_view_ids_round_trip() -> None:
    ids = torch.arange(num_views())
    assert torch.equal(view_ids(views_from_ids(ids)), ids)


def _epoch(loader: TensorLoader, epoch: int) -> list[Batch]:
    loader.set_epoch(epoch)
    return list(loader)


def test_epoch_is_a_pure_function_of_seed_and_epoch() -> None:
    data = _dataset()
    make = lambda seed: TensorLoader(data, 16, MEAN, STD, train=True, augment=True, seed=seed,  # noqa: E731
                                     device="cpu")
    first, again = _epoch(make(7), 3), _epoch(make(7), 3)
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) and torch.equal(a.views, b.views)
    other_epoch, other_seed = _epoch(make(7), 4), _epoch(make(8), 3)
    assert not torch.equal(first[0].indices, other_epoch[0].indices)
    assert not torch.equal(first[0].indices, other_seed[0].indices)
    assert all(b.epoch == 3 for b in first)
    # The generator is the only source of randomness: a global seed change does not matter.
    torch.manual_seed(999)
    assert torch.equal(_epoch(make(7), 3)[1].views, first[1].views)
    assert epoch_generator(7, 3).initial_seed() != epoch_generator(3, 7).initial_seed()


def test_every_index_once_per_epoch_and_last_partial_batch_kept() -> None:
    data = _dataset(50)
    for train in (True, False):
        loader = TensorLoader(data, 16, MEAN, STD, train=train, augment=train, seed=0, device="cpu")
        batches = _epoch(loader, 2)
        assert len(loader) == len(batches) == 4
        assert [len(b.indices) for b in batches] == [16, 16, 16, 2]
        assert torch.equal(torch.cat([b.indices for b in batches]).sort().values, torch.arange(50))
        for batch in batches:
            assert torch.equal(batch.labels, data.labels[batch.indices]) and batch.targets is batch.labels
    dropping = TensorLoader(data, 16, MEAN, STD, train=True, augment=True, seed=0, device="cpu", drop_last=True)
    assert len(dropping) == 3 and [len(b.indices) for b in dropping] == [16, 16, 16]


def test_eval_loader_is_ordered_unaugmented_and_normalised_like_torchvision() -> None:
    data = _dataset(20)
    loader = TensorLoader(data, 8, MEAN, STD, train=False, augment=False, seed=0, device="cpu")
    batches = list(loader)
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(20))
    assert all(b.views is None for b in batches)
    normalise = T.Normalize(MEAN, STD)
    expected = torch.stack([normalise(TF.to_tensor(TF.to_pil_image(image))) for image in data.images])
    assert torch.equal(torch.cat([b.images for b in batches]), expected)


def test_train_batch_is_torchvision_pipeline_of_its_views() -> None:
    data = _dataset(12)
    loader = TensorLoader(data, 12, MEAN, STD, train=True, augment=True, seed=5, device="cpu")
    batch = next(iter(loader))
    assert batch.views.shape == (12, 3) and batch.views.dtype == torch.int64
    normalise = T.Normalize(MEAN, STD)
    expected = torch.stack([normalise(_torchvision_view(data.images[i], *map(int, v)).float() / 255)
                            for i, v in zip(batch.indices.tolist(), batch.views)])
    assert torch.allclose(batch.images, expected, atol=1e-6, rtol=0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(batch.images, normalize(apply_views(data.images[batch.indices], batch.views), mean, std))


def test_unaugmented_training_shuffles_without_views() -> None:
    loader = TensorLoader(_dataset(30), 30, MEAN, STD, train=True, augment=False, seed=0, device="cpu")
    batch = next(iter(loader))
    assert batch.views is None and not torch.equal(batch.indices, torch.arange(30))


def test_resume_mid_epoch_and_channels_last() -> None:
    data = _dataset(40)
    loader = TensorLoader(data, 8, MEAN, STD, train=True, augment=True, seed=1, device="cpu", channels_last=True)
    loader.set_epoch(6)
    full = list(loader)
    tail = list(loader.batches(start=3))
    assert len(tail) == 2
    for a, b in zip(full[3:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.views, b.views)
    assert full[0].images.is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments_are_repro_errors() -> None:
    data = _dataset(4)
    with pytest.raises(ReproError, match="training loaders only"):
        TensorLoader(data, 2, MEAN, STD, train=False, augment=True, seed=0, device="cpu")
    with pytest.raises(ReproError, match="mean has 2 values"):
        TensorLoader(data, 2, MEAN[:2], STD, train=True, augment=True, seed=0, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sees_the_same_augmentation_as_cpu() -> None:
    data = _dataset(33)
    cpu = _epoch(TensorLoader(data, 16, MEAN, STD, train=True, augment=True, seed=2, device="cpu"), 1)
    gpu = _epoch(TensorLoader(data, 16, MEAN, STD, train=True, augment=True, seed=2, device="cuda"), 1)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.indices, b.indices.cpu()) and torch.equal(a.views, b.views.cpu())
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-6, rtol=0)
