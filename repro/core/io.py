"""Files: the one atomic write, the one file hash, and the one reading and cleaning of state dicts.

Atomic write: the bytes go to a temporary file in the target's folder (same filesystem, so the rename is atomic),
are flushed and ``fsync``-ed, the file replaces the target (``os.replace``), and the folder is ``fsync``-ed where
the platform allows it, so the rename itself survives a crash. A write that fails half-way (an exception in the
writer, a full disk, a kill) leaves the previous file intact and no temporary file behind. Writers that may run
concurrently (every rank generating the same synthetic data) are safe: each has its own temporary file and one
complete file wins.

State dicts (a checkpoint file as weights, before any model sees them):

* ``read_checkpoint``: ``torch.load(weights_only=True)`` (or safetensors). Nothing is ever unpickled beyond
  tensors and plain containers, whatever the file's origin: a file that pickles Python objects (an argparse
  namespace, a trainer) is refused with one ReproError naming the file and the object.
* ``is_state_dict``: a non-empty mapping from strings to tensors, nothing else.
* ``unwrap_state_dict``: the state dict itself, or the first entry of ``containers`` (in that order) holding a
  mapping, descended up to four levels: RepDistiller/mdistiller/DeiT ``{'model': sd}``, timm/MoCo
  ``{'state_dict': sd}``, DINO's full checkpoints ``{'teacher': sd, 'student': sd}`` (the teacher first: DINO
  evaluates it), ``{'net': sd}``, ``{'module': sd}``. ``key`` names the entry explicitly instead.
* ``strip_prefixes``, THE prefix rule: a wrapper prefix of ``WRAPPER_PREFIXES`` is removed from every key that
  carries it when the model has no key with that prefix, repeated until none applies (so DINO's student
  ``module.backbone.blocks.0...`` becomes ``blocks.0...``, MoCo's ``module.base_encoder.*`` the encoder's keys
  while ``momentum_encoder.*`` keeps its name, mdistiller's ``module.student.*`` the student's keys). A prefix
  whose removal would make two keys one is left in place. Asking the model (``own_keys``) keeps a network that
  really has a submodule called ``model``/``encoder``/... from losing it. The copies this replaces disagreed:
  "only if every key has it" (ImageNet CNNs, RepDistiller teachers: ``module.`` only), "from the keys that have it"
  (ViTs); every key is not enough for MoCo/DINO/mdistiller files, which hold other networks next to the wanted
  one, and whether what remains fits is decided against the model afterwards
  (``repro.models.weights.fit_state_dict``), so this rule loses nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from repro.core.errors import ReproError

# ---------------------------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically and durably (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and locks are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """JSON with sorted keys, indent 2 and a final newline (the run store's format)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def publish_folder(target: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Create the folder ``target`` whole or not at all: ``build(tmp)`` fills a private sibling folder, which is
    then renamed to ``target``. Concurrent builders (parallel workers starting on the same smoke data) never see
    a half-written folder: the first rename wins and the others discard their copy. An existing non-empty
    ``target`` is returned untouched; an empty one is filled (the rename replaces it); a failing ``build`` leaves
    nothing behind.
    """
    target = Path(target)
    if target.is_dir() and any(target.iterdir()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; data is meant to be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another builder published first: keep theirs (same arguments, same bytes).
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------------------------------------------- hashes


def file_digests(path: str | os.PathLike[str], *algorithms: str) -> dict[str, str]:
    """Hex digests of one file for each named hashlib algorithm, in a single pass over its bytes."""
    digests = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def sha256_file(path: str | os.PathLike[str]) -> str:
    return file_digests(path, "sha256")["sha256"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- state dicts

STATE_DICT_CONTAINERS: tuple[str, ...] = ("state_dict", "model", "teacher", "student", "net", "module")
# DDP/DataParallel, torch.compile, trainers and frameworks (mdistiller, DINO, MoCo, EMA), this package's wrappers
# (FeatureMobileNetV1.net, TimmViT.vit, TimmCNN.net).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.", "net.", "vit.", "student.", "backbone.",
                                     "base_encoder.", "encoder.")
_NESTING = 4  # trainers nest the weights at most a few levels deep


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """What a checkpoint file holds, read without unpickling code; one ReproError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise ReproError(f"checkpoint {path} could not be read: {_unreadable_reason(err)}") from None


def _unreadable_reason(err: Exception) -> str:
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        return (f"it pickles {unsupported.group(1)}, which is never unpickled (it could run code); if you trust the "
                f"file, re-save its weights alone: torch.save(torch.load(file, weights_only=False)['model'], out)")
    if "Weights only load failed" in text:  # torch wraps every unpickling failure in this message
        return "corrupt, truncated or not written by torch.save"
    first_line = (text.strip().splitlines() or [""])[0][:300]
    return f"corrupt, truncated or not written by torch.save ({type(err).__name__}: {first_line})"


def is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: Any, path: str | os.PathLike[str], containers: Iterable[str] = STATE_DICT_CONTAINERS,
                      key: Optional[str] = None) -> dict[str, Tensor]:
    """The state dict inside what a checkpoint file holds (see the module doc); ReproError naming the file."""
    containers = tuple(containers)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ReproError(f"checkpoint {path} has no key {key!r}; it has: {found}")
        obj = obj[key]
    top = obj
    for _ in range(_NESTING):
        if is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in containers if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not is_state_dict(obj):
        found = ", ".join(map(str, list(top)[:10])) if isinstance(top, Mapping) else type(top).__name__
        entries = f", and no {' or '.join(map(repr, containers))} entry holds one" if containers else ""
        hint = "; name the right entry with checkpoint_key=" if key is None and containers else ""
        raise ReproError(f"checkpoint {path} holds no state dict of tensors: not bare{entries} (found: {found}){hint}")
    return dict(obj)


def strip_prefixes(state: Mapping[str, Tensor], own_keys: Collection[str] = ()) -> dict[str, Tensor]:
    """THE prefix rule (module doc): drop wrapper prefixes the model (``own_keys``) does not have."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if not any(k.startswith(prefix) for k in state) or any(k.startswith(prefix) for k in own_keys):
                continue
            stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
            if len(stripped) == len(state):  # else two keys would become one: the prefix means something here
                state, changed = stripped, True
    return state
