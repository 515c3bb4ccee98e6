"""Teacher checkpoints in RepDistiller's format: save, fetch and pin by sha256 (``repro.models.weights`` loads them).

RepDistiller (and WTTM, which reuses its scripts) stores a trained network as ``torch.save({'model':
state_dict, 'epoch': ..., ...})`` at ``<root>/<arch>_vanilla/ckpt_epoch_240.pth``. The original download host
(shape2prog.csail.mit.edu) is dead; the surviving public copy is mdistiller's release ``cifar_teachers.tar``
(anchors.md finding 4). Since a re-uploaded or truncated file would silently change every distillation number,
every use (``verify_teacher``) checks a file's sha256 against a lock.

No source publishes checksums for these files (neither RepDistiller's ``scripts/fetch_pretrained_teachers.sh``
nor mdistiller's README or release page), so the lock shipped with the package (``SHIPPED_LOCK_PATH``) is empty
and read-only: it would hold published checksums, which every file must then match. The user's lock,
``<teacher root>/teachers.lock.json``, lives next to the teacher files, outside the repository: ``fetch_teachers``
records there the sha256 of each file the first time it is obtained, so **the first download defines the lock**,
and what guards against a wrong file is the teacher-accuracy gate (``repro.harness.execute.evaluate_checkpoint``: the
measured top-1 must be within the spec's tolerance of CRD's published accuracy).

One teacher root serves the planner and ``repro teachers fetch``: a spec's ``teachers.root``, else
``$REPRO_TEACHERS``, else ``teachers/cifar100`` (``teachers_root``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from repro.core.io import atomic_torch_save, atomic_write, atomic_write_json, sha256_file
from repro.core.errors import ReproError

log = logging.getLogger(__name__)

# CRD's teacher top-1 on CIFAR-100 (Tian et al., ICLR 2020, Table 1/2), as quoted in WTTM Tables 1 and 3
# (wttm.md 3.2). The teacher-accuracy gate compares a loaded checkpoint against these.
EXPECTED_TEACHER_TOP1: dict[str, float] = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}
TEACHER_ARCHS: tuple[str, ...] = tuple(EXPECTED_TEACHER_TOP1)

CHECKPOINT_NAME = "ckpt_epoch_240.pth"
# mdistiller's GitHub release: a tar of cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth.
BUNDLE_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
# RepDistiller's original per-file host, dead since ~2022; kept as a fallback mirror in case it returns.
LEGACY_URL_TEMPLATE = "http://shape2prog.csail.mit.edu/repo/{arch}_vanilla/ckpt_epoch_240.pth"
# A source is either a tar bundle URL or a per-file URL template containing "{arch}"; tried in order.
DEFAULT_SOURCES: tuple[str, ...] = (BUNDLE_URL, LEGACY_URL_TEMPLATE)
LOCK_NAME = "teachers.lock.json"
# Published checksums only (none exist today); never written by the code, so `make teachers` leaves the repo clean.
SHIPPED_LOCK_PATH = Path(__file__).with_name(LOCK_NAME)
DEFAULT_TEACHERS_ROOT = "teachers/cifar100"
_DOWNLOAD_TIMEOUT_S = 60


# ----------------------------------------------------------------------------------------------- paths, hashes


def teachers_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The teacher root, absolute: ``configured`` (a spec's ``teachers.root``), else ``$REPRO_TEACHERS``, else
    ``teachers/cifar100`` (relative to the working directory)."""
    chosen = configured or os.environ.get("REPRO_TEACHERS") or DEFAULT_TEACHERS_ROOT
    return Path(chosen).expanduser().resolve()


def user_lock_path(root: str | os.PathLike[str]) -> Path:
    """The user's lock: next to the teacher files, in the teacher root (never inside the package)."""
    return Path(root) / LOCK_NAME


def locked_sha256(arch: str, lock_path: str | os.PathLike[str]) -> str | None:
    """The sha256 a file for ``arch`` must have: the published one (shipped lock) if any, else the user lock's."""
    for lock in (read_lock(SHIPPED_LOCK_PATH), read_lock(lock_path)):
        if "sha256" in lock.get(arch, {}):
            return str(lock[arch]["sha256"])
    return None


def lock_origin(arch: str) -> str:
    """Where the sha256 a teacher is checked against comes from, in words (for result and table stamps)."""
    if "sha256" in read_lock(SHIPPED_LOCK_PATH).get(arch, {}):
        return "published checksum"
    return "no published checksum: the first download defined the lock; the accuracy gate is the check"


def teacher_path(arch: str, root: str | os.PathLike[str]) -> Path:
    """The canonical location ``<root>/<arch>_vanilla/ckpt_epoch_240.pth`` (RepDistiller's layout)."""
    return Path(root) / f"{arch}_vanilla" / CHECKPOINT_NAME


def read_lock(lock_path: str | os.PathLike[str] = SHIPPED_LOCK_PATH) -> dict[str, dict[str, str]]:
    """The lock file's entries ``{arch: {"file", "sha256", "source"}}``; a missing lock file is empty."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    try:
        lock = json.loads(lock_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReproError(f"cannot read teacher lock file {lock_path}: {err}") from err
    if not isinstance(lock, dict):
        raise ReproError(f"teacher lock file {lock_path} must hold a JSON object, got {type(lock).__name__}")
    return lock


def _write_lock_allowed(lock_path: Path) -> None:
    if _same_file(lock_path, SHIPPED_LOCK_PATH):
        raise ReproError(f"{lock_path} is the lock shipped with the package (published checksums, read-only); "
                         f"the lock of downloaded teachers belongs in the teacher root ({LOCK_NAME} next to them)")


def _write_lock(lock_path: Path, lock: Mapping[str, Any]) -> None:
    _write_lock_allowed(lock_path)
    try:
        atomic_write_json(lock_path, lock)
    except OSError as err:
        raise ReproError(f"cannot write teacher lock file {lock_path}: {err}") from err


def _same_file(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def verify_teacher(
    arch: str, path: str | os.PathLike[str], lock_path: str | os.PathLike[str] | None = None
) -> str:
    """Check ``path`` against the sha256 locked for ``arch``: the published one if the shipped lock has it, and
    the user lock's (default: ``teachers.lock.json`` in the teacher root above ``<arch>_vanilla/``). Returns the
    hash; raises ReproError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"teacher checkpoint for {arch!r} not found: {path}")
    lock_path = Path(lock_path) if lock_path is not None else user_lock_path(path.parent.parent)
    checks = [(p, read_lock(p).get(arch)) for p in (SHIPPED_LOCK_PATH, lock_path)]
    checks = [(p, entry) for p, entry in checks if entry is not None and "sha256" in entry]
    if not checks:
        raise ReproError(
            f"no sha256 recorded for teacher {arch!r} in {lock_path}; run `repro teachers fetch` "
            f"(it records the hash of each checkpoint it downloads or finds) before using {path}"
        )
    actual = sha256_file(path)
    for where, entry in checks:
        if actual != entry["sha256"]:
            raise ReproError(
                f"teacher checkpoint {path} for {arch!r} fails its sha256 check: expected {entry['sha256']} "
                f"(recorded in {where} from {entry.get('source', 'unknown source')}), got {actual}. "
                "The file is corrupt or not the recorded checkpoint; delete it and fetch it again."
            )
    return actual


# ------------------------------------------------------------------------------------------------------- save


def save_checkpoint_repdistiller(model: nn.Module, path: str | os.PathLike[str], epoch: int = 240) -> Path:
    """Write ``{'model': state_dict, 'epoch': epoch}``, loadable by RepDistiller, mdistiller and
    ``repro.models.weights.load_repdistiller``."""
    path = Path(path)
    model = getattr(model, "module", model)  # DataParallel / DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    atomic_torch_save(path, {"model": state, "epoch": epoch})
    return path


# ---------------------------------------------------------------------------------------------------- fetch


class _DownloadError(Exception):
    """A source could not provide a file (no network, HTTP error, not a tar, file absent from the tar)."""


def fetch_teachers(
    dest_dir: str | os.PathLike[str],
    archs: Sequence[str] = TEACHER_ARCHS,
    lock_path: str | os.PathLike[str] | None = None,
    urls: Sequence[str] = DEFAULT_SOURCES,
) -> dict[str, Path]:
    """Make ``<dest_dir>/<arch>_vanilla/ckpt_epoch_240.pth`` present and verified for every arch.

    Missing files are downloaded from ``urls`` in order (tar bundles, or per-file templates with ``{arch}``).
    A file with a published checksum (shipped lock) must match it. A file with no entry in the user lock
    (``lock_path``, default ``<dest_dir>/teachers.lock.json``; first download, or placed by hand) gets its sha256
    recorded there; a file with an entry must match it. Returns ``{arch: path}``.
    """
    dest = Path(dest_dir)
    lock_path = Path(lock_path) if lock_path is not None else user_lock_path(dest)
    _write_lock_allowed(lock_path)  # before any download
    sources = _download_missing(dest, list(archs), list(urls))
    lock = read_lock(lock_path)
    published = read_lock(SHIPPED_LOCK_PATH)
    for arch in archs:
        path = teacher_path(arch, dest)
        if arch in lock or arch in published:
            verify_teacher(arch, path, lock_path)
            if arch in lock:
                continue
        lock[arch] = {
            "file": path.relative_to(dest).as_posix(),
            "sha256": sha256_file(path),
            "source": sources.get(arch, "local file (present before fetch)"),
        }
        _write_lock(Path(lock_path), lock)
        log.info("recorded sha256 of %s in %s", path, lock_path)
    return {arch: teacher_path(arch, dest) for arch in archs}


def _download_missing(dest: Path, archs: list[str], urls: list[str]) -> dict[str, str]:
    """Fetch the archs whose file is absent; returns {arch: url it came from}."""
    missing = [arch for arch in archs if not teacher_path(arch, dest).is_file()]
    obtained: dict[str, str] = {}
    failures: list[str] = []
    for url in urls:
        if not missing:
            break
        try:
            got = _fetch_per_file(url, missing, dest) if "{arch}" in url else _fetch_bundle(url, missing, dest)
        except _DownloadError as err:
            failures.append(f"{url}: {err}")
            continue
        obtained.update(got)
        missing = [arch for arch in missing if arch not in got]
        if missing:
            failures.append(f"{url}: has no file for {', '.join(missing)}")
    if missing:
        places = ", ".join(str(teacher_path(arch, dest)) for arch in missing)
        raise ReproError(
            f"could not download teacher checkpoints for {', '.join(missing)} "
            f"({'; '.join(failures) or 'no sources given'}). Without network access, get {BUNDLE_URL} elsewhere "
            f"and put each file at {dest}/<arch>_vanilla/{CHECKPOINT_NAME} (here: {places}), then rerun."
        )
    return obtained


def _download(url: str, target: Path) -> None:
    log.info("downloading %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            atomic_write(target, lambda out: shutil.copyfileobj(response, out, 1 << 20))
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _DownloadError(str(getattr(err, "reason", err))) from err


def _fetch_per_file(template: str, archs: list[str], dest: Path) -> dict[str, str]:
    got: dict[str, str] = {}
    errors: list[str] = []
    for arch in archs:
        url = template.format(arch=arch)
        try:
            _download(url, teacher_path(arch, dest))
            got[arch] = url
        except _DownloadError as err:
            errors.append(f"{arch}: {err}")
    if not got:
        raise _DownloadError("; ".join(errors))
    return got


def _fetch_bundle(url: str, archs: list[str], dest: Path) -> dict[str, str]:
    """Download a tar and copy out ``.../<arch>_vanilla/ckpt_epoch_240.pth`` for the requested archs only."""
    with tempfile.TemporaryDirectory(dir=_ensure_dir(dest), prefix=".teachers-download-") as staging:
        archive = Path(staging) / "bundle.tar"
        _download(url, archive)
        wanted = {arch: re.compile(rf"(^|/){re.escape(arch)}_vanilla/{re.escape(CHECKPOINT_NAME)}$") for arch in archs}
        got: dict[str, str] = {}
        try:
            with tarfile.open(archive) as bundle:
                for member in bundle.getmembers():
                    arch = next((a for a, rx in wanted.items() if member.isfile() and rx.search(member.name)), None)
                    if arch is None or arch in got:
                        continue
                    # Copy the member's bytes ourselves instead of extractall: no path from the archive is trusted.
                    _copy_member(bundle, member, teacher_path(arch, dest))
                    got[arch] = url
        except tarfile.TarError as err:
            raise _DownloadError(f"not a readable tar archive ({err})") from err
    if not got:
        raise _DownloadError(f"the archive holds none of {', '.join(f'{a}_vanilla/{CHECKPOINT_NAME}' for a in archs)}")
    return got


def _copy_member(bundle: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = bundle.extractfile(member)
    if source is None:
        raise _DownloadError(f"cannot read {member.name} from the archive")
    with source:
        atomic_write(target, lambda out: shutil.copyfileobj(source, out, 1 << 20))


def _ensure_dir(path: Path) -> Path:
    """Downloads are staged inside the destination (same filesystem, so the final moves are cheap)."""
    path.mkdir(parents=True, exist_ok=True)
    return path
