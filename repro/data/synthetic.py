"""Learnable synthetic CIFAR in the official pickle layout, for the smoke tier and for tests.

The files are byte-for-byte deterministic for the same arguments and are read by the very code that reads the
real CIFAR (``repro.data.cifar.read_cifar``), so the smoke tier exercises the real data path. A
``synthetic_manifest.json`` next to them records the generator arguments and each file's sha256; the reader
checks the files against it instead of torchvision's md5 list.

Only ``classes_used`` of the ``num_classes`` label ids get images (spread evenly over the ids), so a model with
the full 100-way head is trained, and chance accuracy is ``1 / classes_used``. A class is a texture: a sine
grating with its own orientation (up to mirroring) and spatial frequency, painted between two colours of its own.
An image draws a random phase (so every translation is equally likely), jitters orientation and frequency a
little, and adds a small colour cast and pixel noise. Colour and translation-invariant texture are what CNNs with
global pooling learn in a few dozen steps, which is the smoke tier's budget: the WTTM CIFAR smoke tier trains every
student for 20 steps of 25 images at 16x16 (the files stay 32x32; the gratings are coarse enough, at most 0.1
cycles per pixel, to survive averaging 2x2 blocks), and there the CE students reach vgg8 99%, resnet8x4 99%,
wrn_16_2 96%, resnet20 83%, ShuffleV1 73%, ShuffleV2 59% and MobileNetV2 27% (chance 10%; tables/wttm-cifar100.md).

Version 2 (this one) made the classes easier than version 1 (own colours instead of a mostly shared palette,
coarser gratings, a quarter of the noise): version 1's students sat at chance after the smoke tier's steps.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repro.core.io import atomic_write_bytes, sha256_bytes, sha256_file
from repro.data import DATASETS, ImageTensorDataset
from repro.data.cifar import SYNTHETIC_MANIFEST, get_layout, read_cifar
from repro.core.errors import ReproError

GENERATOR_VERSION = 2
IMAGE_SIZE = 32
OWN_COLOUR = 1.0  # weight of a class's own colours against the shared palette (1: every class its own colours)
ORIENTATION_JITTER = 0.05  # radians, per image
FREQUENCY_RANGE = (0.03, 0.1)  # cycles per pixel, per class (half of Nyquist at 16x16 at most)
FREQUENCY_JITTER = 0.1  # relative, per image
CONTRAST = 60.0  # palette scale on the 0..255 scale, around grey 128
NOISE_STD = 4.0  # per-pixel noise, on the 0..255 scale
COLOUR_CAST_STD = 4.0  # per-image, per-channel offset

# What the registered "synthetic_cifar100"/"synthetic_cifar10" readers generate (the smoke tier's data).
SMOKE_ARGS: dict[str, dict[str, int]] = {
    "cifar100": dict(num_classes=100, classes_used=10, train_per_class=200, test_per_class=50, seed=0),
    "cifar10": dict(num_classes=10, classes_used=10, train_per_class=200, test_per_class=50, seed=0),
}


def classes_with_images(num_classes: int, classes_used: int) -> list[int]:
    """The label ids that get images: spread evenly over 0..num_classes-1."""
    return [i * num_classes // classes_used for i in range(classes_used)]


@dataclass(frozen=True)
class _Texture:
    orientation: float  # radians
    frequency: float  # cycles per pixel
    palette: np.ndarray  # [2, 3]: the colours at the grating's troughs and crests, unit scale


def _class_textures(rng: np.random.Generator, count: int) -> list[_Texture]:
    """Orientations spread over [0, pi/2] (jittered), random frequencies, colours mostly from a shared palette.

    A horizontal flip turns orientation t into pi - t, so classes live on [0, pi/2] and every image is drawn
    at t or pi - t with equal odds: flip augmentation never turns one class into another.
    """
    shared = rng.normal(size=(2, 3))
    return [_Texture(orientation=0.5 * np.pi * (c + rng.uniform(-0.3, 0.3)) / count,
                     frequency=rng.uniform(*FREQUENCY_RANGE),
                     palette=(1 - OWN_COLOUR) * shared + OWN_COLOUR * rng.normal(size=(2, 3)))
            for c in range(count)]


def _render(rng: np.random.Generator, texture: _Texture, count: int) -> np.ndarray:
    """``count`` uint8 images [count, 3, 32, 32] of one class texture."""
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    mirrored = rng.integers(0, 2, size=(count, 1, 1)).astype(bool)
    orientation = np.where(mirrored, np.pi - texture.orientation, texture.orientation)
    orientation = orientation + rng.normal(scale=ORIENTATION_JITTER, size=(count, 1, 1))
    frequency = texture.frequency * rng.uniform(1 - FREQUENCY_JITTER, 1 + FREQUENCY_JITTER, size=(count, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
    along = xx * np.cos(orientation) + yy * np.sin(orientation)
    crest = (0.5 + 0.5 * np.sin(2 * np.pi * frequency * along + phase))[:, None]  # [count, 1, H, W] in 0..1
    trough_colour, crest_colour = (c[None, :, None, None] for c in texture.palette)
    colour = trough_colour * (1 - crest) + crest_colour * crest
    cast = rng.normal(scale=COLOUR_CAST_STD, size=(count, 3, 1, 1))
    noise = rng.normal(scale=NOISE_STD, size=(count, 3, IMAGE_SIZE, IMAGE_SIZE))
    return np.clip(np.rint(128.0 + CONTRAST * colour + cast + noise), 0, 255).astype(np.uint8)


def _generate(rng: np.random.Generator, label_ids: list[int], train_per_class: int, test_per_class: int
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images and labels per split, shuffled so that classes are interleaved as in the real files."""
    textures = _class_textures(rng, len(label_ids))
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images = np.concatenate([_render(rng, t, per_class) for t in textures])
        labels = np.repeat(np.asarray(label_ids, dtype=np.int64), per_class)
        order = rng.permutation(len(labels))
        splits[split] = (images[order], labels[order])
    return splits


def _batch_entry(variant: str, images: np.ndarray, labels: np.ndarray, num_classes: int, batch_label: str,
                 first_index: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"batch_label": batch_label, "data": images.reshape(len(images), -1)}
    label_list = [int(v) for v in labels]
    if variant == "cifar100":
        entry["fine_labels"] = label_list
        entry["coarse_labels"] = [v * 20 // num_classes for v in label_list]
    else:
        entry["labels"] = label_list
    entry["filenames"] = [f"synthetic_{v:03d}_{first_index + i:06d}.png" for i, v in enumerate(label_list)]
    return entry


def _meta_entry(variant: str, num_classes: int, cases_per_batch: int) -> dict[str, Any]:
    names = [f"class_{i:03d}" for i in range(num_classes)]
    if variant == "cifar100":
        return {"fine_label_names": names, "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]}
    return {"label_names": names, "num_cases_per_batch": cases_per_batch, "num_vis": IMAGE_SIZE * IMAGE_SIZE * 3}


def _file_entries(variant: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int
                  ) -> dict[str, dict[str, Any]]:
    """File name -> pickled dict, in torchvision's file names for the variant."""
    layout = get_layout(variant)
    entries: dict[str, dict[str, Any]] = {}
    for split in ("train", "test"):
        images, labels = splits[split]
        names = layout.split_files(split)
        bounds = np.linspace(0, len(labels), len(names) + 1).astype(int)
        for number, name in enumerate(names):
            lo, hi = bounds[number], bounds[number + 1]
            label = f"{'training' if split == 'train' else 'testing'} batch {number + 1} of {len(names)}"
            entries[name] = _batch_entry(variant, images[lo:hi], labels[lo:hi], num_classes, label, int(lo))
    train_files = len(layout.split_files("train"))
    entries[layout.meta_file] = _meta_entry(variant, num_classes, len(splits["train"][1]) // train_files)
    return entries


def _generator_args(num_classes: int, classes_used: int, train_per_class: int, test_per_class: int, seed: int,
                    variant: str) -> dict[str, Any]:
    return {"version": GENERATOR_VERSION, "variant": variant, "num_classes": num_classes,
            "classes_used": classes_used, "train_per_class": train_per_class, "test_per_class": test_per_class,
            "seed": seed}


def _check_args(num_classes: int, classes_used: int, train_per_class: int, test_per_class: int, variant: str) -> None:
    get_layout(variant)
    if not 1 <= classes_used <= num_classes:
        raise ReproError(f"synthetic CIFAR: classes_used={classes_used} must be in 1..num_classes={num_classes}")
    if train_per_class < 1 or test_per_class < 1:
        raise ReproError("synthetic CIFAR: train_per_class and test_per_class must be at least 1")


def write_synthetic_cifar(root: str | Path, *, num_classes: int = 100, classes_used: int = 10,
                          train_per_class: int, test_per_class: int, seed: int, variant: str = "cifar100") -> Path:
    """Write synthetic CIFAR pickles plus ``synthetic_manifest.json`` to ``root/<base folder>``; return that folder."""
    _check_args(num_classes, classes_used, train_per_class, test_per_class, variant)
    folder = Path(root) / get_layout(variant).base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label_ids = classes_with_images(num_classes, classes_used)
    splits = _generate(rng, label_ids, train_per_class, test_per_class)
    files = {name: pickle.dumps(entry, protocol=2)
             for name, entry in _file_entries(variant, splits, num_classes).items()}
    manifest = {"generator": "repro.data.synthetic",
                "args": _generator_args(num_classes, classes_used, train_per_class, test_per_class, seed, variant),
                "classes_with_images": label_ids, "files": {name: sha256_bytes(data) for name, data in files.items()}}
    # The manifest goes first: a concurrent writer that finds CIFAR files must also find the manifest, or it
    # would take them for the real data. Until every file matches its hash, readers (ensure_synthetic_cifar)
    # write the files themselves; concurrent writers write identical bytes, each file whole or not at all.
    atomic_write_bytes(folder / SYNTHETIC_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return folder


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / SYNTHETIC_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _manifest_matches(folder: Path, manifest: dict[str, Any] | None, args: dict[str, Any]) -> bool:
    if manifest is None or manifest.get("args") != args:
        return False
    files = manifest.get("files", {})
    return all((folder / name).is_file() and sha256_file(folder / name) == sha
               for name, sha in files.items())


def ensure_synthetic_cifar(root: str | Path, *, num_classes: int = 100, classes_used: int = 10,
                           train_per_class: int, test_per_class: int, seed: int, variant: str = "cifar100") -> Path:
    """Write the synthetic data only when it is missing or differs from these arguments; return its folder.

    Refuses (ReproError) to write into a folder that already holds CIFAR files without a synthetic manifest:
    those are presumably the real data.
    """
    _check_args(num_classes, classes_used, train_per_class, test_per_class, variant)
    layout = get_layout(variant)
    folder = Path(root) / layout.base_folder
    args = _generator_args(num_classes, classes_used, train_per_class, test_per_class, seed, variant)
    manifest = read_manifest(folder)
    if _manifest_matches(folder, manifest, args):
        return folder
    known_files = set(layout.official_md5())
    if manifest is None and folder.is_dir() and any(p.name in known_files for p in folder.iterdir()):
        raise ReproError(f"{folder} holds {variant} files without a {SYNTHETIC_MANIFEST}: presumably the real "
                         f"data, which synthetic data must not overwrite; use another data root for the smoke tier")
    return write_synthetic_cifar(root, num_classes=num_classes, classes_used=classes_used,
                                 train_per_class=train_per_class, test_per_class=test_per_class, seed=seed,
                                 variant=variant)


def read_synthetic_cifar(root: str | Path, split: str, variant: str = "cifar100") -> ImageTensorDataset:
    """Read synthetic data with the real reader, pinning each file to the sha256 in its manifest."""
    folder = Path(root) / get_layout(variant).base_folder
    manifest = read_manifest(folder)
    if manifest is None:
        raise ReproError(f"{folder} has no readable {SYNTHETIC_MANIFEST}; write it with ensure_synthetic_cifar")
    return read_cifar(root, split, variant, download=False, verify_md5=False, expected_sha256=manifest["files"],
                      name=f"synthetic_{variant}")


def _register_smoke_reader(variant: str) -> None:
    def read(root: Path, split: str, download: bool) -> ImageTensorDataset:
        # Generating is local and cheap, so it happens whether or not downloads are allowed.
        ensure_synthetic_cifar(root, variant=variant, **SMOKE_ARGS[variant])
        return read_synthetic_cifar(root, split, variant)

    read.__doc__ = f"The smoke tier's synthetic {variant} (arguments: SMOKE_ARGS[{variant!r}])."
    DATASETS.register(f"synthetic_{variant}")(read)


for _variant in SMOKE_ARGS:
    _register_smoke_reader(_variant)
