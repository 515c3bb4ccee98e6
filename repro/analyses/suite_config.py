"""The data and options the suites run on: ``EvalData`` (the folders, or tiny synthetic data in the real layouts:
ImageNet val folder, ImageNet-C, cue-conflict), ``SuiteOptions`` (shared options, as recorded) and ``suite_config``
(the ``cfg`` mapping of ``repro.analyses.run_suites``). Which folder a suite reads is its registration's ``data``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from repro.analyses.resolve import IMAGENET_CLASSES, LoadedModel
from repro.core.errors import ReproError

SMOKE_EVAL_ROOT = Path("data/smoke-eval")
SYNTHETIC_IMAGENET_CLASSES = 10  # WNID folders written for a 1000-way model (the first ImageNet classes)
# The command-line flag of each EvalData folder.
DATA_FLAGS = {"data_root": "--data-root", "imagenet_c_root": "--imagenet-c-root",
              "cue_conflict_root": "--cue-conflict-root"}


def suite_data(suite: str) -> str:
    """The EvalData field (folder) a registered suite reads."""
    from repro.analyses import SUITES

    if suite not in SUITES:
        raise ReproError(f"suite {suite!r} has no data folder option in `repro eval` (known: {SUITES.names()})")
    return SUITES.get(suite).data


def data_flags(suites: Sequence[str]) -> list[str]:
    """The command-line flags that give the folders of these suites, sorted."""
    return sorted({DATA_FLAGS[suite_data(s)] for s in suites})


@dataclass
class EvalData:
    data_root: Optional[Path] = None  # labelled class-per-folder set (ImageNet val: <wnid>/*.JPEG)
    imagenet_c_root: Optional[Path] = None  # <corruption>/<severity>/<wnid>/*.JPEG
    cue_conflict_root: Optional[Path] = None  # <shape>/<shape><i>-<texture><j>.png
    synthetic: bool = False
    corruptions: Optional[list[str]] = None  # None: the 15 benchmark corruptions

    def root_for(self, suite: str) -> Optional[Path]:
        return getattr(self, suite_data(suite))

    def check(self, suites: Sequence[str]) -> None:
        missing = data_flags([s for s in suites if self.root_for(s) is None])
        if missing:
            raise ReproError(f"suites {', '.join(suites)} need {' and '.join(missing)} (or --synthetic for tiny "
                             f"generated data)")

    def as_record(self) -> dict[str, Any]:
        return {"synthetic": self.synthetic, "data_root": _text(self.data_root),
                "imagenet_c_root": _text(self.imagenet_c_root), "cue_conflict_root": _text(self.cue_conflict_root),
                "corruptions": self.corruptions}


def _text(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(path)


def synthetic_class_names(num_outputs: int) -> list[str]:
    """WNID folders for a 1000-way (ImageNet) model, else one folder per output (read in sorted order)."""
    from repro.data.imagenet_c_synthetic import default_class_names

    if num_outputs == IMAGENET_CLASSES:
        return default_class_names(SYNTHETIC_IMAGENET_CLASSES)
    return [f"class_{i:04d}" for i in range(num_outputs)]


def build_synthetic_eval_data(root: Path, num_outputs: int, image_size: int, suites: Sequence[str],
                              corruptions: Optional[Sequence[str]] = None, seed: int = 0) -> EvalData:
    """Tiny data in the real layouts under ``root`` for the given suites; reused when already written.

    ImageNet-C gets ``corruptions`` (default: one of each family, ``SMOKE_CORRUPTIONS``) at all 5 severities."""
    from repro.data.cue_conflict_synthetic import write_synthetic_cue_conflict
    from repro.data.imagefolder import write_synthetic_imagefolder
    from repro.analyses import SUITES
    from repro.data.imagenet_c_synthetic import SMOKE_CORRUPTIONS, SEVERITIES, write_imagenet_c_folder
    from repro.core.io import atomic_write_json

    size = max(int(image_size), 32)  # imagecorruptions refuses images under 32 px
    names = synthetic_class_names(num_outputs)
    wanted = {suite_data(s) for s in suites if s in SUITES}
    corruptions = list(corruptions or SMOKE_CORRUPTIONS)
    manifest = {"seed": seed, "size": size, "classes": names, "folders": sorted(wanted | {"data_root"}),
                "corruptions": corruptions, "version": 1}
    manifest_path = root / "synthetic_eval.json"
    data = EvalData(data_root=root / "imagefolder" / "val", synthetic=True, corruptions=corruptions,
                    imagenet_c_root=root / "imagenet-c" if "imagenet_c_root" in wanted else None,
                    cue_conflict_root=root / "cue-conflict" if "cue_conflict_root" in wanted else None)
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return data
    _clear_synthetic_folders(root, manifest_path)
    per_class = 2 if len(names) <= 20 else 1
    write_synthetic_imagefolder(root / "imagefolder", classes=names, per_class=per_class, size=size, seed=seed,
                                splits=("val",))
    if data.imagenet_c_root is not None:
        write_imagenet_c_folder(data.data_root, data.imagenet_c_root, corruptions, SEVERITIES, seed)
    if data.cue_conflict_root is not None:
        write_synthetic_cue_conflict(data.cue_conflict_root, images_per_class=2, image_size=size, seed=seed)
    atomic_write_json(manifest_path, manifest)
    return data


SYNTHETIC_FOLDERS = ("imagefolder", "imagenet-c", "cue-conflict")


def _clear_synthetic_folders(root: Path, manifest_path: Path) -> None:
    """Remove data an earlier synthetic build wrote with other arguments (never data it did not write)."""
    present = [root / name for name in SYNTHETIC_FOLDERS if (root / name).exists()]
    if present and not manifest_path.is_file():
        raise ReproError(f"{root} holds {', '.join(p.name for p in present)} not written by --synthetic "
                         f"(no {manifest_path.name}); give an empty or new folder")
    for path in present:
        shutil.rmtree(path)
    manifest_path.unlink(missing_ok=True)


@contextmanager
def synthetic_folder(where: Optional[str]) -> Iterator[Path]:
    """The given folder, or a temporary one removed afterwards."""
    if where:
        path = Path(where).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="repro-eval-") as tmp:
        yield Path(tmp)


@dataclass
class SuiteOptions:
    """Options shared by the suites (``repro.analyses.predict.EvalOptions``), as recorded."""

    batch_size: int = 64
    num_workers: Optional[int] = None
    image_size: int = 224
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    label_space: str = "auto"
    amp: bool = False
    progress: bool = True
    top10_rule: str = "largest-difference"
    top10_k: int = 10

    def shared(self) -> dict[str, Any]:
        values = {"batch_size": self.batch_size, "image_size": self.image_size, "label_space": self.label_space,
                  "amp": self.amp, "progress": self.progress}
        optional = {"num_workers": self.num_workers, "mean": self.mean, "std": self.std}
        return {**values, **{k: tuple(v) if isinstance(v, list) else v for k, v in optional.items() if v is not None}}


def suite_config(suites: Sequence[str], data: EvalData, options: SuiteOptions,
                 other: Optional[LoadedModel] = None, names: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """The ``cfg`` mapping of ``repro.analyses.run_suites`` for these suites, data and options."""
    cfg: dict[str, Any] = options.shared()
    for suite in suites:
        cfg[suite] = {"root": str(data.root_for(suite))}
    if "imagenet-c" in cfg and data.corruptions is not None:
        cfg["imagenet-c"]["corruptions"] = list(data.corruptions)
    if "top10" in cfg:
        if other is None:
            raise ReproError("suite top10 compares two models: pass --other MODEL (e.g. the SSL teaching assistant)")
        cfg["top10"].update(other_model=other.module, names=names, rule=options.top10_rule, k=options.top10_k)
    return cfg


def data_from_args(args: argparse.Namespace) -> EvalData:
    def folder(value: Optional[str]) -> Optional[Path]:
        return Path(value).expanduser() if value else None

    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    return EvalData(folder(args.data_root), folder(args.imagenet_c_root), folder(args.cue_conflict_root),
                    corruptions=corruptions)

