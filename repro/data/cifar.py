"""CIFAR-10/100 from the official python pickles (the layout torchvision downloads).

The URLs, archive names and per-file md5s are torchvision's own (``torchvision.datasets.CIFAR10/100``), so a
folder torchvision accepts is accepted here and vice versa. The reader returns the whole split as one uint8
tensor [N, 3, 32, 32] (the pickles store each row as 1024 R, then G, then B bytes, i.e. already CHW).

``verify_md5=False`` reads files in the same layout that are not the official ones (the synthetic smoke data,
which carries its own sha256 manifest and passes it as ``expected_sha256``).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from repro.core.io import file_digests
from repro.data import DATASETS, ImageTensorDataset, combine_fingerprint
from repro.core.errors import ReproError

SYNTHETIC_MANIFEST = "synthetic_manifest.json"
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant lives on disk and what its pickles are called (taken from torchvision's class)."""

    variant: str
    source: type  # torchvision's dataset class, the single source of URLs and md5s
    label_key: str  # "fine_labels" (CIFAR-100) or "labels" (CIFAR-10)

    @property
    def base_folder(self) -> str:
        return self.source.base_folder

    @property
    def meta_file(self) -> str:
        return self.source.meta["filename"]

    @property
    def label_names_key(self) -> str:
        return self.source.meta["key"]

    def split_files(self, split: str) -> list[str]:
        listed = self.source.train_list if split == "train" else self.source.test_list
        return [name for name, _ in listed]

    def official_md5(self) -> dict[str, str]:
        listed = self.source.train_list + self.source.test_list
        return {**{name: md5 for name, md5 in listed}, self.meta_file: self.source.meta["md5"]}


LAYOUTS: dict[str, CifarLayout] = {
    "cifar100": CifarLayout("cifar100", CIFAR100, "fine_labels"),
    "cifar10": CifarLayout("cifar10", CIFAR10, "labels"),
}


def get_layout(variant: str) -> CifarLayout:
    if variant not in LAYOUTS:
        raise ReproError(f"unknown CIFAR variant {variant!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[variant]


def _unusable(layout: CifarLayout, folder: Path, split: str, reason: str) -> ReproError:
    expected = ", ".join(layout.split_files("train") + layout.split_files("test") + [layout.meta_file])
    return ReproError(
        f"{layout.variant} {split} data is not usable in {folder}: {reason}. Expected the official python-pickle "
        f"layout {folder}/{{{expected}}} as extracted from {layout.source.url} (torchvision's CIFAR layout). "
        f"Place the extracted files there, allow the download, or run the smoke tier (TIER=smoke), which "
        f"generates synthetic data in this layout.")


def _download(layout: CifarLayout, root: Path, folder: Path, split: str) -> None:
    try:
        download_and_extract_archive(layout.source.url, download_root=str(root), filename=layout.source.filename,
                                     md5=layout.source.tgz_md5)
    except Exception as err:  # no network, proxy, disk full, bad archive: all end the same way for the user
        raise _unusable(layout, folder, split, f"files are missing and the download failed ({err})") from None


def _verified_sha256(layout: CifarLayout, folder: Path, split: str, names: list[str], verify_md5: bool,
                     expected_sha256: Optional[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Hash each file once; check md5 against torchvision's list and/or sha256 against a manifest."""
    official = layout.official_md5()
    named_sha256 = []
    for name in names:
        digests = file_digests(folder / name, "md5", "sha256")
        if verify_md5 and digests["md5"] != official[name]:
            raise _unusable(layout, folder, split, f"{name} has md5 {digests['md5']}, expected {official[name]} "
                                                   f"(corrupt or not the official file)")
        if expected_sha256 is not None and digests["sha256"] != expected_sha256.get(name):
            raise _unusable(layout, folder, split, f"{name} does not match the sha256 recorded in its manifest")
        named_sha256.append((name, digests["sha256"]))
    return named_sha256


def _load_pickle(path: Path) -> dict[str, Any]:
    # latin1 as torchvision does; keys may come back as bytes (python-2 pickles read with encoding="bytes").
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _read_split(layout: CifarLayout, folder: Path, split: str, names: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    chunks, labels = [], []
    for name in names:
        entry = _load_pickle(folder / name)
        if "data" not in entry or layout.label_key not in entry:
            raise _unusable(layout, folder, split, f"{name} lacks the keys 'data' and {layout.label_key!r}")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
            raise _unusable(layout, folder, split,
                            f"{name}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
        if len(entry[layout.label_key]) != data.shape[0]:
            raise _unusable(layout, folder, split,
                            f"{name}: {len(entry[layout.label_key])} labels for {data.shape[0]} images")
        chunks.append(data)
        labels.append(np.asarray(entry[layout.label_key], dtype=np.int64))
    num_classes = len(_load_pickle(folder / layout.meta_file)[layout.label_names_key])
    all_labels = np.concatenate(labels)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= num_classes):
        raise _unusable(layout, folder, split, f"labels fall outside 0..{num_classes - 1}")
    return np.concatenate(chunks), all_labels, num_classes


def read_cifar(root: str | Path, split: str, variant: str = "cifar100", *, download: bool = True,
               verify_md5: bool = True, expected_sha256: Optional[Mapping[str, str]] = None,
               name: Optional[str] = None) -> ImageTensorDataset:
    """Read one split of CIFAR-10/100 from ``root/<base folder>`` into an ``ImageTensorDataset``.

    With ``verify_md5`` every file must match torchvision's md5; missing files are downloaded when
    ``download`` is set. ``expected_sha256`` (file name -> sha256) additionally pins the exact files.
    """
    layout = get_layout(variant)
    root = Path(root)
    folder = root / layout.base_folder
    if split not in ("train", "test"):
        raise ReproError(f"unknown split {split!r} for {variant}; expected 'train' or 'test'")
    if verify_md5 and (folder / SYNTHETIC_MANIFEST).exists():
        raise _unusable(layout, folder, split, f"it holds synthetic smoke data ({SYNTHETIC_MANIFEST}), not the "
                                               f"official files; use another data root for real runs")
    names = layout.split_files(split) + [layout.meta_file]
    if any(not (folder / n).is_file() for n in names) and verify_md5 and download:
        _download(layout, root, folder, split)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _unusable(layout, folder, split, f"missing {', '.join(missing)}")
    named_sha256 = _verified_sha256(layout, folder, split, names, verify_md5, expected_sha256)
    data, labels, num_classes = _read_split(layout, folder, split, layout.split_files(split))
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE)))
    return ImageTensorDataset(images=images, labels=torch.from_numpy(labels), num_classes=num_classes,
                              name=name or variant,
                              fingerprint=combine_fingerprint(f"{name or variant}/{split}", named_sha256))


@DATASETS.register("cifar100")
def cifar100(root: Path, split: str, download: bool) -> ImageTensorDataset:
    return read_cifar(root, split, "cifar100", download=download)


@DATASETS.register("cifar10")
def cifar10(root: Path, split: str, download: bool) -> ImageTensorDataset:
    return read_cifar(root, split, "cifar10", download=download)
