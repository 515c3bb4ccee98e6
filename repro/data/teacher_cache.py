"""The exact teacher-output cache.

Under the CIFAR augmentation a frozen teacher's logits are a function of (image index, dy, dx, flip): 162
views per image. They are cached in one memory-mapped file per (teacher, data, normalisation, dtype), filled
lazily during training and shared by every run, method and seed that uses the same teacher.

Unlike torchdistill's abandoned cache (keyed by dataset index only, hence stale under augmentation), the key
here is the view, and the file name is a hash of everything the logits depend on: the teacher checkpoint's
hash (plus anything else that changes its numerics, e.g. autocast: fold it into ``teacher_key``), the data's
fingerprint and the normalisation. A changed teacher or data file therefore opens a different file; a JSON
sidecar records the keys in plain text.

File layout: a filled flag per (image, view) as uint8 [N, V], then the logits [N, V, K] in float16 or float32
(float16 for CIFAR-100 is 50000 x 162 x 100 x 2 bytes, about 1.6 GB, sparse until filled). A writer stores the
logits before it sets the flag, so concurrent readers see either a miss or a complete entry.

Returned logits are always the cache-dtype values (live results are rounded the same way), so a run's numbers do
not depend on whether the cache was cold or warm.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from repro.data import ImageTensorDataset, hash_file
from repro.data.loader import (PADDING, apply_views, channel_stats, identity_views, normalize, num_views, view_ids,
                               views_from_ids)
from repro.errors import ReproError
from repro.methods.base import Batch

CACHE_FORMAT = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
_ALIGN = 64  # the logits block starts on an aligned offset


def checkpoint_key(path: str | Path, extra: str = "") -> str:
    """A ``teacher_key`` from a checkpoint file's sha256 plus anything else that changes the teacher's outputs."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"teacher checkpoint not found: {path}")
    return hash_file(path, "sha256")["sha256"] + (f"+{extra}" if extra else "")


def _normalization_json(normalization: Sequence[Any]) -> Any:
    """Nested tuples/lists of numbers -> lists of floats, so (mean, std) hashes the same however it was given."""
    if isinstance(normalization, (list, tuple)):
        return [_normalization_json(item) for item in normalization]
    if isinstance(normalization, Tensor):
        return _normalization_json(normalization.tolist())
    return float(normalization)


class TeacherCache:
    """Memory-mapped logits of a frozen teacher for every (image, view); open with ``TeacherCache.open``."""

    def __init__(self, path: Path, keys: dict[str, Any], readonly: bool = False) -> None:
        self.path = path
        self.keys = keys
        self.num_images = int(keys["num_images"])
        self.num_views = int(keys["num_views"])
        self.num_classes = int(keys["num_classes"])
        self.padding = int(keys["padding"])
        self.dtype = DTYPES[keys["dtype"]]
        self._torch_dtype = getattr(torch, keys["dtype"])
        self.readonly = readonly
        mode = "r" if readonly else "r+"
        shape = (self.num_images, self.num_views)
        self._flags = np.memmap(path, dtype=np.uint8, mode=mode, shape=shape)
        self._logits = np.memmap(path, dtype=self.dtype, mode=mode, offset=self._logits_offset(self.keys),
                                 shape=(*shape, self.num_classes))

    @staticmethod
    def _logits_offset(keys: dict[str, Any]) -> int:
        flags = int(keys["num_images"]) * int(keys["num_views"])
        return -(-flags // _ALIGN) * _ALIGN

    @classmethod
    def _file_size(cls, keys: dict[str, Any]) -> int:
        entries = int(keys["num_images"]) * int(keys["num_views"]) * int(keys["num_classes"])
        return cls._logits_offset(keys) + entries * np.dtype(DTYPES[keys["dtype"]]).itemsize

    @classmethod
    def open(cls, cache_dir: str | Path, *, teacher_key: str, data_fingerprint: str, normalization: Sequence[Any],
             num_images: int, num_classes: int, dtype: str = "float16", padding: int = PADDING,
             readonly: bool = False) -> "TeacherCache":
        """Open (creating if needed) the cache file for these keys in ``cache_dir``."""
        if dtype not in DTYPES:
            raise ReproError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        keys = {"format": CACHE_FORMAT, "teacher_key": str(teacher_key), "data_fingerprint": str(data_fingerprint),
                "normalization": _normalization_json(normalization), "num_images": int(num_images),
                "num_classes": int(num_classes), "num_views": num_views(padding), "padding": int(padding),
                "dtype": dtype}
        digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:24]
        cache_dir = Path(cache_dir)
        path = cache_dir / f"teacher-{digest}.logits"
        sidecar = path.with_suffix(".json")
        if readonly and not path.is_file():
            raise ReproError(f"no teacher cache for these keys in {cache_dir} (expected {path.name})")
        if not readonly:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cls._create(path, sidecar, keys)
        cls._check_existing(path, sidecar, keys)
        return cls(path, keys, readonly=readonly)

    @classmethod
    def for_dataset(cls, cache_dir: str | Path, *, teacher_key: str, dataset: ImageTensorDataset,
                    mean: Sequence[float], std: Sequence[float], dtype: str = "float16") -> "TeacherCache":
        """``open`` with the data keys taken from ``dataset`` and normalisation (mean, std)."""
        return cls.open(cache_dir, teacher_key=teacher_key, data_fingerprint=dataset.fingerprint,
                        normalization=(tuple(mean), tuple(std)), num_images=len(dataset),
                        num_classes=dataset.num_classes, dtype=dtype)

    @classmethod
    def _create(cls, path: Path, sidecar: Path, keys: dict[str, Any]) -> None:
        """Publish the sidecar and a zero-filled (all-missing) file atomically; a concurrent creator wins harmlessly."""
        if path.exists():
            return
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sidecar_tmp = sidecar.with_name(f".{sidecar.name}.{tag}")
        sidecar_tmp.write_text(json.dumps(keys, indent=2, sort_keys=True))
        os.replace(sidecar_tmp, sidecar)
        tmp = path.with_name(f".{path.name}.{tag}")
        with open(tmp, "wb") as handle:
            handle.truncate(cls._file_size(keys))  # sparse: zero flags mean "not filled"
        try:
            os.link(tmp, path)  # fails if another process published first: keep theirs, it may hold entries
        except FileExistsError:
            pass
        except OSError:  # filesystems without hard links
            if not path.exists():
                os.replace(tmp, path)
        tmp.unlink(missing_ok=True)

    @classmethod
    def _check_existing(cls, path: Path, sidecar: Path, keys: dict[str, Any]) -> None:
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            raise ReproError(f"teacher cache {path} has no readable sidecar {sidecar.name}; "
                             f"delete both files") from None
        if recorded != keys:
            raise ReproError(f"teacher cache {path}: sidecar keys differ from the requested ones; delete both files")
        if path.stat().st_size != cls._file_size(keys):
            raise ReproError(f"teacher cache {path} has size {path.stat().st_size}, expected "
                             f"{cls._file_size(keys)} (truncated or corrupt); delete it")

    def _positions(self, indices: Tensor, views: Optional[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(image index, view id) arrays for the memmaps; views None means the unaugmented image."""
        indices = indices.detach().to("cpu", torch.int64)
        if views is None:
            views = identity_views(indices.shape[0], self.padding)
        ids = view_ids(views.detach().to("cpu"), self.padding)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_images):
            raise ReproError(f"teacher cache {self.path.name}: image index outside 0..{self.num_images - 1}")
        return indices.numpy(), ids.numpy()

    def filled(self, indices: Tensor, views: Optional[Tensor]) -> Tensor:
        """bool [B] on ``indices.device``: whether each (image, view) is cached."""
        rows, ids = self._positions(indices, views)
        return torch.from_numpy(np.asarray(self._flags[rows, ids]) == 1).to(indices.device)

    def lookup(self, indices: Tensor, views: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(logits float32 [B, K], hit bool [B]) on ``indices.device``; rows that miss are zero."""
        rows, ids = self._positions(indices, views)
        hit = np.asarray(self._flags[rows, ids]) == 1  # flags first: a set flag guarantees complete logits
        logits = np.zeros((rows.shape[0], self.num_classes), dtype=np.float32)
        logits[hit] = np.asarray(self._logits[rows[hit], ids[hit]])
        return torch.from_numpy(logits).to(indices.device), torch.from_numpy(hit).to(indices.device)

    def round(self, logits: Tensor) -> Tensor:
        """float32 logits as they come back from the cache; rows the cache dtype cannot hold stay as they were."""
        rounded = logits.detach().to(self._torch_dtype).float()
        return torch.where(torch.isfinite(rounded).all(dim=1, keepdim=True), rounded, logits.detach().float())

    def store(self, indices: Tensor, views: Optional[Tensor], logits: Tensor) -> None:
        """Write the logits of these (image, view) pairs; rows that overflow the cache dtype are not stored."""
        if self.readonly:
            raise ReproError(f"teacher cache {self.path.name} was opened read-only")
        if logits.shape != (indices.shape[0], self.num_classes):
            raise ValueError(f"logits {tuple(logits.shape)} do not match [{indices.shape[0]}, {self.num_classes}]")
        rows, ids = self._positions(indices, views)
        values = logits.detach().to(self._torch_dtype).cpu().numpy()  # torch casts overflow to inf silently
        keep = np.isfinite(values).all(axis=1)
        self._logits[rows[keep], ids[keep]] = values[keep]
        self._flags[rows[keep], ids[keep]] = 1

    def filled_fraction(self) -> float:
        return float(np.count_nonzero(self._flags)) / max(1, self._flags.size)

    def flush(self) -> None:
        if not self.readonly:
            self._logits.flush()
            self._flags.flush()

    def close(self) -> None:
        self.flush()
        del self._logits, self._flags

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _teacher_logits(teacher: nn.Module, images: Tensor) -> Tensor:
    teacher.eval()
    with torch.no_grad():
        return teacher(images).float()


class CachedTeacher:
    """A ``repro.methods.base.TeacherFn`` that serves cached logits and runs the teacher only on misses.

    ``hits``/``misses`` count (image, view) pairs, for logging and tests.
    """

    def __init__(self, cache: TeacherCache, teacher: nn.Module, device: torch.device | str) -> None:
        self.cache, self.teacher, self.device = cache, teacher, torch.device(device)
        self.hits = 0
        self.misses = 0

    def __call__(self, batch: Batch, feats: bool, preact: bool) -> tuple[Tensor, Optional[list[Tensor]]]:
        if feats:
            raise ReproError("the teacher-output cache holds logits only; loss terms that need teacher features "
                             "must run with the live teacher (disable the teacher cache for this run)")
        logits, hit = self.cache.lookup(batch.indices, batch.views)
        logits, hit = logits.to(self.device), hit.to(self.device)
        miss = (~hit).nonzero().squeeze(1)
        self.hits += int(hit.sum())
        self.misses += int(miss.numel())
        if miss.numel():
            live = _teacher_logits(self.teacher, batch.images.to(self.device)[miss])
            miss_views = batch.views.to(self.device)[miss] if batch.views is not None else None
            self.cache.store(batch.indices.to(self.device)[miss], miss_views, live)
            logits[miss] = self.cache.round(live)
        return logits, None


def cached_teacher_fn(cache: TeacherCache, teacher: nn.Module, device: torch.device | str) -> CachedTeacher:
    """The callable to pass as ``Distiller(..., teacher_fn=...)``."""
    return CachedTeacher(cache, teacher, device)


def fill_cache(cache: TeacherCache, teacher: nn.Module, dataset: ImageTensorDataset, mean: Sequence[float],
               std: Sequence[float], device: torch.device | str, batch_size: int = 512,
               progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Compute every missing (image, view) entry; return how many were computed.

    Pairs are visited image-major (all 162 views of an image together) so writes to the file are sequential.
    ``progress(done_pairs, total_pairs)`` is called after each batch.
    """
    if dataset.fingerprint != cache.keys["data_fingerprint"] or len(dataset) != cache.num_images:
        raise ReproError(f"teacher cache {cache.path.name} was opened for other data than {dataset.name!r}")
    device = torch.device(device)
    images = dataset.images.to(device)
    mean_t = channel_stats(mean, images.shape[1], "mean", device)
    std_t = channel_stats(std, images.shape[1], "std", device)
    total = cache.num_images * cache.num_views
    computed = 0
    for start in range(0, total, batch_size):
        pairs = torch.arange(start, min(start + batch_size, total))
        indices, views = pairs // cache.num_views, views_from_ids(pairs % cache.num_views, cache.padding)
        todo = ~cache.filled(indices, views)
        if todo.any():
            indices, views = indices[todo], views[todo]
            batch_images = apply_views(images[indices.to(device)], views.to(device), cache.padding)
            cache.store(indices, views, _teacher_logits(teacher, normalize(batch_images, mean_t, std_t)))
            computed += int(todo.sum())
        if progress is not None:
            progress(int(pairs[-1]) + 1, total)
    cache.flush()
    return computed
