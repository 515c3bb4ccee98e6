"""The exact teacher-output cache.

Under the CIFAR augmentation a frozen teacher's logits are a function of (image index, dy, dx, flip): 162
views per image. They are cached in one memory-mapped file per (teacher, data, normalisation, dtype), filled
lazily during training and shared by every run, method and seed that uses the same teacher.

Unlike torchdistill's abandoned cache (keyed by dataset index only, hence stale under augmentation), the key
here is the view, and the file name is a hash of everything the logits depend on: the teacher checkpoint's
hash (plus anything else that changes its numerics, e.g. autocast: fold it into ``teacher_key``), the data's
fingerprint and the normalisation. A changed teacher or data file therefore opens a different file; a JSON
sidecar records the keys in plain text.

File layout (format 2): a filled flag per (image, view) as uint8 [N, V], a checksum per entry as uint32 [N, V],
then the logits [N, V, K] (with a last feature, [N, V, K + D]) in float16 or float32 (float16 for CIFAR-100 is 50000 x 162 x 100 x 2 bytes, about
1.6 GB, sparse until filled). A writer stores the logits, then the checksum, then the flag. Several writers on
several nodes share one file (often over NFS), and neither NFS nor a weakly ordered CPU guarantees that a reader
sees those writes in that order: a flag may be visible before its logits (which then read as zeros, a uniform
teacher). So a lookup serves an entry only when its checksum matches the logits it reads (the checksum also
covers the entry's position, so zeros never match); any other entry is a miss, recomputed by the live teacher
and written again. ``TeacherCache.open(..., readonly=True)`` gives jobs that only read (after
``repro teachers cache``); their misses are computed live and not stored.

Lookups take the batch's host copies of indices and views (``Batch.host_indices``/``host_views``) when the
loader provides them, so a warm cache reads nothing back from the device.

Returned logits are always the cache-dtype values (live results are rounded the same way), so a run's numbers do
not depend on whether the cache was cold or warm.

A cache opened with ``feature_width=D`` holds, after each entry's K logits, the teacher's last feature: the pooled
penultimate vector ``feats[-1]`` of the post-activation forward (``model(x, is_feat=True)``), D wide. It serves the
loss terms that read only that feature (CRD, ITRD, RKD, PKT: ``LossTerm.reads_teacher_features == "last"``); the
returned feature list holds None in every other place, so a term reading another feature fails loudly. Its keys
differ from the logits-only file's (``feature_width`` is one of them), and a logits-only file keeps its name.
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

from repro.core.io import atomic_write_text, sha256_file
from repro.data import ImageTensorDataset
from repro.data.loader import (PADDING, apply_views, channel_stats, identity_views, normalize, num_views, view_ids,
                               views_from_ids)
from repro.core.errors import ReproError
from repro.data.batch import Batch

CACHE_FORMAT = 2  # 2: per-entry checksums
DTYPES = {"float16": np.float16, "float32": np.float32}
_ALIGN = 64  # the logits block starts on an aligned offset


def checkpoint_key(path: str | Path, extra: str = "") -> str:
    """A ``teacher_key`` from a checkpoint file's sha256 plus anything else that changes the teacher's outputs."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"teacher checkpoint not found: {path}")
    return sha256_file(path) + (f"+{extra}" if extra else "")


def _normalization_json(normalization: Sequence[Any]) -> Any:
    """Nested tuples/lists of numbers -> lists of floats, so (mean, std) hashes the same however it was given."""
    if isinstance(normalization, (list, tuple)):
        return [_normalization_json(item) for item in normalization]
    if isinstance(normalization, Tensor):
        return _normalization_json(normalization.tolist())
    return float(normalization)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def entry_checksums(logits: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint32 [B]: a hash of each entry's logit bytes and its (image, view) position.

    Position-dependent, so an all-zero entry (never written, or a flag seen before its logits) does not match
    a zero checksum, and an entry copied to the wrong place does not match either. Not cryptographic: it
    detects torn and unordered writes, not tampering.
    """
    with np.errstate(over="ignore"):
        width = logits.shape[1] * logits.dtype.itemsize // 2  # uint16 words per entry (explicit: B may be 0)
        words = np.ascontiguousarray(logits).view(np.uint16).reshape(logits.shape[0], width).astype(np.uint64)
        salt = (np.arange(1, words.shape[1] + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        position = rows.astype(np.uint64) * np.uint64(1_000_003) + ids.astype(np.uint64) + np.uint64(1)
        hashed = _mix(_mix(words + salt + (position * _GOLDEN)[:, None]).sum(axis=1, dtype=np.uint64) + position)
    return (hashed & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class TeacherCache:
    """Memory-mapped logits of a frozen teacher for every (image, view); open with ``TeacherCache.open``."""

    def __init__(self, path: Path, keys: dict[str, Any], readonly: bool = False) -> None:
        self.path = path
        self.keys = keys
        self.num_images = int(keys["num_images"])
        self.num_views = int(keys["num_views"])
        self.num_classes = int(keys["num_classes"])
        self.feature_width = int(keys.get("feature_width", 0))
        self.width = self.num_classes + self.feature_width  # values per entry: logits, then the last feature
        self.padding = int(keys["padding"])
        self.dtype = DTYPES[keys["dtype"]]
        self._torch_dtype = getattr(torch, keys["dtype"])
        self.readonly = readonly
        mode = "r" if readonly else "r+"
        shape = (self.num_images, self.num_views)
        self._flags = np.memmap(path, dtype=np.uint8, mode=mode, shape=shape)
        self._checksums = np.memmap(path, dtype=np.uint32, mode=mode, offset=self._checksums_offset(self.keys),
                                    shape=shape)
        self._logits = np.memmap(path, dtype=self.dtype, mode=mode, offset=self._logits_offset(self.keys),
                                 shape=(*shape, self.width))

    @staticmethod
    def _checksums_offset(keys: dict[str, Any]) -> int:
        flags = int(keys["num_images"]) * int(keys["num_views"])
        return -(-flags // _ALIGN) * _ALIGN

    @classmethod
    def _logits_offset(cls, keys: dict[str, Any]) -> int:
        end = cls._checksums_offset(keys) + int(keys["num_images"]) * int(keys["num_views"]) * 4
        return -(-end // _ALIGN) * _ALIGN

    @classmethod
    def _file_size(cls, keys: dict[str, Any]) -> int:
        width = int(keys["num_classes"]) + int(keys.get("feature_width", 0))
        entries = int(keys["num_images"]) * int(keys["num_views"]) * width
        return cls._logits_offset(keys) + entries * np.dtype(DTYPES[keys["dtype"]]).itemsize

    @classmethod
    def open(cls, cache_dir: str | Path, *, teacher_key: str, data_fingerprint: str, normalization: Sequence[Any],
             num_images: int, num_classes: int, dtype: str = "float16", padding: int = PADDING,
             readonly: bool = False, feature_width: int = 0) -> "TeacherCache":
        """Open (creating if needed) the cache file for these keys in ``cache_dir``; ``feature_width`` > 0 also
        holds the teacher's last feature of that width after each entry's logits."""
        if dtype not in DTYPES:
            raise ReproError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if feature_width < 0:
            raise ReproError(f"teacher cache feature_width must be 0 or more, got {feature_width}")
        keys = {"format": CACHE_FORMAT, "teacher_key": str(teacher_key), "data_fingerprint": str(data_fingerprint),
                "normalization": _normalization_json(normalization), "num_images": int(num_images),
                "num_classes": int(num_classes), "num_views": num_views(padding), "padding": int(padding),
                "dtype": dtype}
        if feature_width:  # absent from a logits-only file's keys, so its name (their hash) did not change
            keys["feature_width"] = int(feature_width)
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
        atomic_write_text(sidecar, json.dumps(keys, indent=2, sort_keys=True))
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
        """(image index, view id) arrays for the memmaps; views None means the unaugmented image. Pass CPU
        tensors (a batch's ``host_indices``/``host_views``) to avoid a device read."""
        indices = indices.detach().to("cpu", torch.int64)
        if views is None:
            views = identity_views(indices.shape[0], self.padding)
        rows, ids = indices.numpy(), view_ids(views.detach().to("cpu"), self.padding).numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise ReproError(f"teacher cache {self.path.name}: image index outside 0..{self.num_images - 1}")
        return rows, ids

    def _valid(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(valid bool [B], entries [B, width] in the cache dtype): an entry is valid when its flag is set and its
        checksum matches the values read (a flag seen before its values, or a torn write, is not)."""
        flagged = np.asarray(self._flags[rows, ids]) == 1
        logits = np.zeros((rows.shape[0], self.width), dtype=self.dtype)
        valid = flagged.copy()
        if flagged.any():
            logits[flagged] = np.asarray(self._logits[rows[flagged], ids[flagged]])
            expected = np.asarray(self._checksums[rows[flagged], ids[flagged]])
            valid[flagged] = entry_checksums(logits[flagged], rows[flagged], ids[flagged]) == expected
        return valid, logits

    def filled(self, indices: Tensor, views: Optional[Tensor]) -> Tensor:
        """bool [B] on ``indices.device``: whether each (image, view) is cached (and its checksum holds)."""
        valid, _ = self._valid(*self._positions(indices, views))
        return torch.from_numpy(valid).to(indices.device)

    def lookup_host(self, indices: Tensor, views: Optional[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(entries float32 [B, width], hit bool [B]) as host arrays; rows that miss are zero. An entry is the
        logits, then (``feature_width`` > 0) the last feature."""
        valid, logits = self._valid(*self._positions(indices, views))
        logits = logits.astype(np.float32)
        logits[~valid] = 0.0
        return logits, valid

    def lookup(self, indices: Tensor, views: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(entries float32 [B, width], hit bool [B]) on ``indices.device``; rows that miss are zero."""
        logits, hit = self.lookup_host(indices, views)
        return torch.from_numpy(logits).to(indices.device), torch.from_numpy(hit).to(indices.device)

    def round(self, logits: Tensor) -> Tensor:
        """float32 logits as they come back from the cache; rows the cache dtype cannot hold stay as they were."""
        rounded = logits.detach().to(self._torch_dtype).float()
        return torch.where(torch.isfinite(rounded).all(dim=1, keepdim=True), rounded, logits.detach().float())

    def store(self, indices: Tensor, views: Optional[Tensor], logits: Tensor) -> None:
        """Write the entries (logits, then the last feature if the cache holds one) of these (image, view) pairs;
        rows that overflow the cache dtype are not stored."""
        if self.readonly:
            raise ReproError(f"teacher cache {self.path.name} was opened read-only")
        if logits.shape != (indices.shape[0], self.width):
            raise ValueError(f"entries {tuple(logits.shape)} do not match [{indices.shape[0]}, {self.width}]")
        rows, ids = self._positions(indices, views)
        values = logits.detach().to(self._torch_dtype).cpu().numpy()  # torch casts overflow to inf silently
        keep = np.isfinite(values).all(axis=1)
        rows, ids, values = rows[keep], ids[keep], values[keep]
        if not len(rows):
            return  # every row overflowed the cache dtype: nothing to store, the teacher serves them live
        # Logits, then checksum, then flag: a reader that sees them out of order gets a checksum mismatch (a miss).
        self._logits[rows, ids] = values
        self._checksums[rows, ids] = entry_checksums(values, rows, ids)
        self._flags[rows, ids] = 1

    def filled_fraction(self) -> float:
        return float(np.count_nonzero(self._flags)) / max(1, self._flags.size)

    def flush(self) -> None:
        if not self.readonly:
            self._logits.flush()
            self._checksums.flush()
            self._flags.flush()

    def close(self) -> None:
        self.flush()
        del self._logits, self._checksums, self._flags

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _teacher_entries(teacher: nn.Module, images: Tensor, with_feature: bool) -> Tensor:
    """float32 [B, K] logits, or (``with_feature``) [B, K + D]: the logits, then the last feature of the
    post-activation forward (the model contract of ``repro.models``: ``model(x, is_feat=True)``)."""
    teacher.eval()
    with torch.no_grad():
        if not with_feature:
            return teacher(images).float()
        feats, logits = teacher(images, is_feat=True, preact=False)
        return torch.cat([logits.float(), feats[-1].flatten(1).float()], dim=1)


class CachedTeacher:
    """A ``repro.methods.base.TeacherFn`` that serves cached logits (and last features) and runs the teacher only
    on misses.

    With a cache that holds the last feature, a request for features returns ``num_features`` places with the
    last feature in the last one and None in the others. A request for pre-activation features is served only when
    ``serves_preact`` says the teacher's last feature is the same in both kinds (the caller checked it).
    ``hits``/``misses`` count (image, view) pairs, for logging and tests.
    """

    def __init__(self, cache: TeacherCache, teacher: nn.Module, device: torch.device | str, num_features: int = 0,
                 serves_preact: bool = False) -> None:
        self.cache, self.teacher, self.device = cache, teacher, torch.device(device)
        self.num_features, self.serves_preact = int(num_features), bool(serves_preact)
        self.hits = 0
        self.misses = 0

    def _check_request(self, feats: bool, preact: bool) -> None:
        if not feats:
            return
        if not self.cache.feature_width or self.num_features < 1:
            raise ReproError("the teacher-output cache holds logits only; loss terms that need teacher features "
                             "must run with the live teacher (disable the teacher cache for this run)")
        if preact and not self.serves_preact:
            raise ReproError("the teacher-output cache holds the post-activation last feature; a pre-activation "
                             "request is served from it only for a teacher whose last feature is the same in both")

    def __call__(self, batch: Batch, feats: bool, preact: bool) -> tuple[Tensor, Optional[list[Optional[Tensor]]]]:
        self._check_request(feats, preact)
        # Host copies of the positions when the loader has them: a warm cache then reads nothing from the device.
        indices = batch.host_indices if batch.host_indices is not None else batch.indices
        views = batch.host_views if batch.host_views is not None else batch.views
        entries_np, hit = self.cache.lookup_host(indices, views)
        entries = torch.from_numpy(entries_np).to(self.device, non_blocking=True)
        miss = np.flatnonzero(~hit)
        self.hits += int(hit.sum())
        self.misses += int(miss.size)
        if miss.size:
            miss_t = torch.from_numpy(miss)
            live = _teacher_entries(self.teacher, batch.images[miss_t.to(batch.images.device)].to(self.device),
                                    with_feature=self.cache.feature_width > 0)
            if not self.cache.readonly:  # a read-only job (after `repro teachers cache`) computes misses live only
                miss_views = views[miss_t.to(views.device)] if views is not None else None
                self.cache.store(indices[miss_t.to(indices.device)], miss_views, live)
            entries[miss_t.to(self.device)] = self.cache.round(live)
        if not self.cache.feature_width:
            return entries, None
        classes = self.cache.num_classes
        logits = entries[:, :classes].contiguous()
        if not feats:
            return logits, None
        return logits, [None] * (self.num_features - 1) + [entries[:, classes:].contiguous()]


def cached_teacher_fn(cache: TeacherCache, teacher: nn.Module, device: torch.device | str, num_features: int = 0,
                      serves_preact: bool = False) -> CachedTeacher:
    """The callable to pass as ``Distiller(..., teacher_fn=...)``."""
    return CachedTeacher(cache, teacher, device, num_features, serves_preact)


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
            cache.store(indices, views, _teacher_entries(teacher, normalize(batch_images, mean_t, std_t),
                                                         with_feature=cache.feature_width > 0))
            computed += int(todo.sum())
        if progress is not None:
            progress(int(pairs[-1]) + 1, total)
    cache.flush()
    return computed
