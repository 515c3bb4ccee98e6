"""The process-wide numeric switches of a run: determinism, TF32, and what non-deterministic kernels ran.

torch keeps these switches in global state, so every run sets all of them from its own recipe (a run never
inherits a previous run's switches in the same process), and the result records what actually ran.

- ``CUBLAS_WORKSPACE_CONFIG`` is read by cuBLAS when it creates its handle, i.e. at the first matrix multiply on
  a GPU: ``set_cublas_workspace`` is called at every entry point (the command line, a job), before any CUDA work.
  Setting it later passes torch's check but leaves cuBLAS non-deterministic, so a run that finds it missing
  after CUDA started says so.
- ``deterministic`` (recipe): ``strict`` raises on a kernel without a deterministic implementation; ``warn``
  runs it and records it as a deviation (SDPA backward in the ViTs, some pooling backwards on CUDA); ``off``
  lets cuDNN autotune and pick any algorithm (fastest, not bit-reproducible).
- ``tf32`` (recipe): TF32 matrix multiplies and cuDNN convolutions on Ampere and later GPUs. Off means true
  fp32, which is what the papers' GPUs (no TF32 before Ampere) computed.

Importing this module does not import torch (the command line calls ``set_cublas_workspace`` before it loads it).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"  # one of the two values NVIDIA documents for deterministic cuBLAS
DETERMINISM_MODES = ("strict", "warn", "off")
# Recipes written before the modes existed said ``deterministic: true``: deterministic algorithms, with
# kernels that have none only warned about on CUDA (and nothing on CPU needed one), i.e. ``warn``.
LEGACY_DETERMINISM = {True: "warn", False: "off"}
# How torch words the two warnings deterministic mode raises (c10 alertNotDeterministic, alertCuBLASConfig...).
_NONDETERMINISTIC_MARK = "does not have a deterministic implementation"
_CUBLAS_MARK = "because it uses CuBLAS"


def set_cublas_workspace() -> None:
    """Make cuBLAS deterministic for this process and its children; call before any CUDA work."""
    os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)


def apply_determinism(mode: str, device: torch.device) -> list[str]:
    """Set every determinism switch for ``mode``; returns the deviations to record."""
    import torch

    if mode not in DETERMINISM_MODES:
        raise ValueError(f"deterministic must be one of {DETERMINISM_MODES}, got {mode!r}")
    notes = []
    on = mode != "off"
    if on and device.type == "cuda" and torch.cuda.is_initialized() and not os.environ.get(CUBLAS_WORKSPACE_ENV):
        notes.append(f"{CUBLAS_WORKSPACE_ENV} was not set before CUDA started: cuBLAS may be non-deterministic")
    set_cublas_workspace()
    torch.use_deterministic_algorithms(on, warn_only=mode == "warn")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on  # autotuning picks algorithms by timing: off only
    if not on:
        notes.append("deterministic algorithms off (cuDNN autotuning): not bit-reproducible")
    return notes


def apply_tf32(enabled: bool, device: torch.device) -> list[str]:
    """Set both TF32 switches (torch's defaults differ: matmul off, cuDNN on); returns the deviations."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    if enabled and device.type == "cuda" and tf32_capable(device):
        return ["TF32 matrix multiplies and convolutions (10-bit mantissa inputs), not fp32"]
    return []


def tf32_capable(device: torch.device) -> bool:
    """TF32 exists on compute capability 8.0 (Ampere) and later."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def numerics_stamp(device: torch.device) -> dict[str, object]:
    """What the numeric switches are now, for a result's environment: TF32 (None where it cannot apply: CPU or a
    GPU before Ampere), determinism, and the CUDA / cuDNN versions (None on CPU)."""
    import torch

    cuda = device.type == "cuda"
    tf32 = tf32_capable(device)
    return {
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if tf32 else None,
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32) if tf32 else None,
        "deterministic_algorithms": ("warn" if torch.is_deterministic_algorithms_warn_only_enabled() else "strict")
                                    if torch.are_deterministic_algorithms_enabled() else "off",
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "cublas_workspace_config": os.environ.get(CUBLAS_WORKSPACE_ENV) if cuda else None,
    }


@contextmanager
def record_nondeterministic_kernels() -> Iterator[list[str]]:
    """Collect, as deviation lines, every warning deterministic mode raises inside the block (each kernel once).

    Every occurrence is seen (the filter is ``always``, not Python's once-per-location default); other warnings
    are shown as usual.
    """
    notes: list[str] = []
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        previous = warnings.showwarning
        warnings.filterwarnings("always", message=f".*{_NONDETERMINISTIC_MARK}")
        warnings.filterwarnings("always", message=f".*{_CUBLAS_MARK}")

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            text = str(message)
            if _NONDETERMINISTIC_MARK in text:
                note = f"non-deterministic kernel ran: {text.split(_NONDETERMINISTIC_MARK)[0].strip()}"
            elif _CUBLAS_MARK in text:
                note = f"non-deterministic cuBLAS ({CUBLAS_WORKSPACE_ENV} unset)"
            else:
                previous(message, category, filename, lineno, file, line)
                return
            if note not in notes:
                notes.append(note)

        warnings.showwarning = show
        yield notes
