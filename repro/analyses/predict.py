"""Batched inference over an image folder, and the options every evaluation suite shares.

Suites read a plain ``cfg`` mapping (see ``repro.analyses`` for the keys). Options common to all suites may sit at
the top level of ``cfg``; a section named after the suite (``cfg["imagenet-c"]``) overrides them. A key in a
suite's section that the suite does not know is an error, so a typo cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, TypeVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from repro.analyses import suite
from repro.core.errors import ReproError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # DeiT/timm convention: resize 256 -> crop 224


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EvalOptions:
    """Options shared by every suite. ``resize_size=None`` means: centre-crop only (the suite may set a default)."""

    root: Optional[str] = None
    batch_size: int = 64
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    image_size: int = 224
    resize_size: Optional[int] = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    amp: bool = False  # bf16 autocast; off by default so that numbers are fp32 unless asked
    label_space: str = "auto"  # "auto", "imagenet" or "folder" (see LABEL_SPACES)
    progress: bool = True

    def transform(self) -> transforms.Compose:
        return build_eval_transform(self.image_size, self.resize_size, self.mean, self.std)

    def protocol(self) -> dict[str, Any]:
        """The transform as data, for the result record."""
        return {
            "resize": self.resize_size,
            "interpolation": "bicubic" if self.resize_size is not None else None,
            "center_crop": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "amp": self.amp,
        }


Options = TypeVar("Options", bound=EvalOptions)


def options_from_cfg(cls: type[Options], cfg: Mapping[str, Any], section: str) -> Options:
    """Build a suite's options from the top-level keys it knows plus its own section (which must not have unknowns)."""
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {f.name for f in dataclasses.fields(EvalOptions)} - {"root"}  # a data root is never shared
    values = {key: value for key, value in cfg.items() if key in shared}
    own = cfg.get(section) or {}
    if not isinstance(own, Mapping):
        raise ReproError(f"cfg[{section!r}] must be a mapping of options, got {type(own).__name__}")
    unknown = sorted(set(own) - names)
    if unknown:
        raise ReproError(f"unknown option(s) {unknown} for suite {section!r}; known: {sorted(names)}")
    values.update(own)
    # YAML gives lists; options are frozen (hashable, unchangeable once recorded)
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def require_root(options: EvalOptions, section: str) -> Path:
    if not options.root:
        raise ReproError(f"suite {section!r} needs a data folder: set cfg[{section!r}]['root']")
    root = Path(options.root).expanduser()
    if not root.is_dir():
        raise ReproError(f"suite {section!r}: data folder {root} does not exist")
    return root


# --------------------------------------------------------------------------------------------- data


def build_eval_transform(
    image_size: int,
    resize_size: Optional[int] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Resize (shorter side, bicubic as timm/DeiT) when asked, centre-crop, to tensor, normalise."""
    steps: list[Callable] = []
    if resize_size is not None:
        steps.append(transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC))
    steps += [transforms.CenterCrop(image_size), transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def build_folder_loader(
    root: str | Path,
    transform: Callable,
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An ImageFolder loader in file order (no shuffle), so ``dataset.samples`` gives each row's path."""
    root = Path(root)
    if not root.is_dir():
        raise ReproError(f"image folder {root} does not exist")
    try:
        dataset = datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or a class folder without images
        raise ReproError(f"image folder {root} is not a class-per-folder image set: {err}") from None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


# --------------------------------------------------------------------------------------------- inference


class Predictions(NamedTuple):
    logits: Tensor  # [N, K] float32 on the CPU
    labels: Tensor  # [N] ImageFolder class indices (folder order)
    paths: list[str]


@torch.inference_mode()
def predict_folder(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    *,
    amp: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> Predictions:
    """Run ``model`` over every image of ``loader`` (an ImageFolder loader in file order) and keep the logits."""
    device = torch.device(device)
    model.eval().to(device)
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(images)
        if not isinstance(output, Tensor):
            raise ReproError(
                f"model returned {type(output).__name__}, evaluation needs one logits tensor "
                "(for distilled ViTs choose the cls/dist/averaged head when building the model)"
            )
        all_logits.append(output.float().cpu())
        all_labels.append(labels)
    paths = [path for path, _ in loader.dataset.samples]
    return Predictions(torch.cat(all_logits), torch.cat(all_labels), paths)


# --------------------------------------------------------------------------------------------- label spaces


@functools.lru_cache(maxsize=1)
def _imagenet_synsets() -> tuple[str, ...]:
    from timm.data import ImageNetInfo  # sorted ILSVRC-2012 WNIDs: position == standard class index

    return tuple(ImageNetInfo().label_names())


def _imagenet_labels(class_names: Sequence[str], num_outputs: int) -> Tensor:
    if num_outputs != 1000:
        raise ReproError(f"label space 'imagenet' needs a 1000-way model, this one has {num_outputs} outputs")
    index = {wnid: i for i, wnid in enumerate(_imagenet_synsets())}
    unknown = [name for name in class_names if name not in index]
    if unknown:
        raise ReproError(f"folder names are not ImageNet-1k WNIDs: {unknown[:5]}")
    return torch.tensor([index[name] for name in class_names])


def _folder_labels(class_names: Sequence[str], num_outputs: int) -> Tensor:
    if len(class_names) != num_outputs:
        raise ReproError(
            f"label space 'folder' maps the {len(class_names)} sorted class folders to model outputs one to one, "
            f"but the model has {num_outputs} outputs"
        )
    return torch.arange(len(class_names))


LABEL_SPACES: dict[str, Callable[[Sequence[str], int], Tensor]] = {
    "imagenet": _imagenet_labels,
    "folder": _folder_labels,
}


def resolve_label_space(class_names: Sequence[str], num_outputs: int, label_space: str = "auto") -> str:
    """``auto``: ImageNet WNID folders read by a 1000-way model use the standard class indices (this matters for
    subsets such as a 100-class val split); anything else (synthetic smoke sets, CIFAR folders) is read in sorted
    folder order."""
    if label_space != "auto":
        if label_space not in LABEL_SPACES:
            raise ReproError(f"unknown label space {label_space!r}; known: auto, {', '.join(sorted(LABEL_SPACES))}")
        return label_space
    if num_outputs == 1000 and set(class_names) <= set(_imagenet_synsets()):
        return "imagenet"
    return "folder"


def model_label_map(class_names: Sequence[str], num_outputs: int, label_space: str = "auto") -> Tensor:
    """``map[folder index] = model output index`` for the given folder classes."""
    return LABEL_SPACES[resolve_label_space(class_names, num_outputs, label_space)](class_names, num_outputs)


def to_model_labels(predictions: Predictions, class_names: Sequence[str], label_space: str = "auto") -> Tensor:
    """The ground-truth labels of ``predictions`` expressed as model output indices."""
    mapping = model_label_map(class_names, predictions.logits.shape[1], label_space)
    return mapping[predictions.labels]


# --------------------------------------------------------------------------------------------- clean suite


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k that the number of classes allows."""
    ks = [k for k in ks if k <= logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@dataclass(frozen=True)
class ValOptions(EvalOptions):
    """ImageNet-val protocol: resize to image_size / 0.875 (256 for 224), then centre-crop."""

    resize_size: Optional[int] = -1  # -1: image_size / 0.875

    def __post_init__(self) -> None:
        if self.resize_size == -1:
            object.__setattr__(self, "resize_size", math.floor(self.image_size / CROP_RATIO))  # floor, as timm


@suite("clean", data="data_root", headline=lambda r: f"top-1 {r['top1']:.2f}")
def clean_suite(model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent) on a labelled class-per-folder set (e.g. ImageNet val)."""
    options = options_from_cfg(ValOptions, cfg, "clean")
    root = require_root(options, "clean")
    loader = build_folder_loader(
        root, options.transform(), options.batch_size, options.num_workers, torch.device(device).type == "cuda"
    )
    predictions = predict_folder(model, loader, device, amp=options.amp, progress=options.progress, desc="clean")
    classes = loader.dataset.classes
    labels = to_model_labels(predictions, classes, options.label_space)
    label_space = resolve_label_space(classes, predictions.logits.shape[1], options.label_space)
    return {
        **topk_accuracy(predictions.logits, labels),
        "n_images": len(labels),
        "protocol": {"root": str(root), "eval_transform": options.protocol(), "label_space": label_space},
    }
