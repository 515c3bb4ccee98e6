"""What produced a number: library versions, git commit, device."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pydantic")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the repository holding this package, with ``-dirty`` when the tree has local changes."""
    repo = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict[str, Any]:
    """Where a number was computed, and the numeric switches it ran under (read from torch, not the recipe):
    TF32 (None where it cannot apply), determinism, CUDA and cuDNN versions (None on CPU)."""
    from repro.core.numerics import numerics_stamp

    return {
        "device": device.type,
        "device_name": device_name(device),
        "versions": library_versions(),
        "commit": git_commit(),
        "hostname": platform.node(),
        **numerics_stamp(device),
    }


def canonical_model_key(model_cfg: dict[str, Any]) -> str:
    """A stable name for weights that come from a model family's own loader (pretrained tag or local file)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
