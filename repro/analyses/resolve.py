"""Which model ``repro eval`` / ``repro figures`` evaluate: MODEL resolved from a run id of the store (or a unique
prefix of one), a checkpoint file (``--arch`` names its architecture; a bare state dict or RepDistiller's
``{'model': ...}``), or a registered/timm model name with ``--pretrained`` or ``--checkpoint`` (loaded by its model
family, which understands foreign layouts); a distilled ViT is evaluated on one chosen head. Also what the model
was built or trained for (input size, normalisation), which the suites default to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from repro.core.errors import ReproError

IMAGENET_CLASSES = 1000

def _cls_head(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    return cls_logits


def _dist_head(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    return dist_logits


def _avg_head(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    return (cls_logits + dist_logits) / 2


# The heads of a distilled ViT (class token, distillation token) and how the logits are formed from them.
HEADS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls_head, "dist": _dist_head, "avg": _avg_head,
}
DEFAULT_HEAD = "avg"  # DeiT evaluates distilled models on the average of both heads (ssta.md 4)
SHARED_HEAD = "shared"  # recorded for distilled XCiT: no dist token, its one head is both cls and dist


class DistilledHead(nn.Module):
    """A distilled timm ViT (``repro.models.vit.TimmViT``) evaluated on one chosen head."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.combine = HEADS[head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.model.vit
        tokens = vit.forward_features(x)
        return self.combine(vit.head(tokens[:, 0]), vit.head_dist(tokens[:, 1]))


def with_head(model: nn.Module, head: Optional[str]) -> tuple[nn.Module, str]:
    """The model to evaluate and the head recorded: distilled ViTs use ``head`` (default avg); others have one."""
    if head is not None and head not in HEADS:
        raise ReproError(f"--head must be one of {sorted(HEADS)}, got {head!r}")
    if not getattr(model, "is_distilled", False):
        if head not in (None, DEFAULT_HEAD):
            raise ReproError(f"--head {head}: the model has one classifier head (only distilled ViTs have cls/dist)")
        return model, "single"
    if getattr(model, "shared_dist_head", False):
        # Distilled XCiT (facebookresearch/xcit xcit.py): training returns (x, x), one head took CE and the hard
        # KD, and the test forward is that head: cls, dist and avg are all the same logits.
        return model, SHARED_HEAD
    chosen = head or DEFAULT_HEAD
    return DistilledHead(model, chosen).eval(), chosen


@dataclass
class LoadedModel:
    module: nn.Module
    info: dict[str, Any]  # what the record says about the model
    label: str  # a short name for tables and figures
    num_classes: int
    run_id: Optional[str] = None
    config: Optional[dict[str, Any]] = None  # the run's config, for run models


def resolve_run_id(store: Any, ref: str) -> Optional[str]:
    """``ref`` as a run id of the store: exact, or a unique prefix of at least 6 characters (tables show 8)."""
    if store.config(ref) is not None:
        return ref
    if len(ref) < 6 or not all(c in "0123456789abcdef" for c in ref):
        return None
    matches = [run_id for run_id in store.run_ids() if run_id.startswith(ref)]
    if len(matches) > 1:
        raise ReproError(f"run id prefix {ref!r} is ambiguous: {', '.join(matches[:5])}")
    return matches[0] if matches else None


def _load_run(store: Any, run_id: str, device: torch.device) -> tuple[nn.Module, dict[str, Any], str]:
    from repro.harness.execute import load_run_model

    result = store.result(run_id) or {}
    if result.get("status") != "done":
        raise ReproError(f"run {run_id} has not finished (status: {result.get('status', 'pending')}); "
                         f"only finished runs can be evaluated")
    model, weights_key = load_run_model(store, run_id, device)
    config = store.config(run_id) or {}
    info = {"source": "run", "run_id": run_id, "run_label": result.get("label"), "tier": config.get("tier"),
            "arch": config["model"]["arch"], "num_classes": config["model"]["num_classes"],
            "model_args": config["model"].get("args", {}), "weights_key": weights_key}
    return model, info, config


def _load_checkpoint_file(path: Path, arch: Optional[str], num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    from repro.core.io import sha256_file
    from repro.models.weights import load_repdistiller

    if not arch:
        raise ReproError(f"MODEL {path} is a checkpoint file: name its architecture with --arch "
                         f"(a registered model name, e.g. resnet56 or deit_tiny_patch16_224)")
    model = load_repdistiller(arch, path, num_classes=num_classes)  # strict: every tensor must fit
    return model, {"source": "checkpoint", "path": str(path), "sha256": sha256_file(path), "arch": arch,
                   "num_classes": num_classes}


def _load_named(name: str, pretrained: bool, checkpoint: Optional[str], num_classes: int
                ) -> tuple[nn.Module, dict[str, Any]]:
    from repro.core.io import sha256_file
    from repro.models import MODELS, create_model, model_names

    registered = name in set(model_names()) | set(MODELS)
    if not registered and not _is_timm_name(name):
        raise ReproError(f"MODEL {name!r} is not a run id in the store, not a file, and not a registered or timm "
                         f"model name")
    if not pretrained and not checkpoint:
        raise ReproError(f"MODEL {name!r} is a model name: give --pretrained (its published weights) or "
                         f"--checkpoint FILE (random weights are never evaluated)")
    kwargs: dict[str, Any] = {"checkpoint": checkpoint} if checkpoint else {"pretrained": True}
    # Names timm knows but the suite does not register go through the generic timm ViT family.
    arch, extra = (name, {}) if registered else ("timm_vit", {"timm_name": name})
    try:
        model = create_model(arch, num_classes=num_classes, **extra, **kwargs)
    except TypeError:  # a family whose factories take no weight arguments (the CIFAR zoo)
        how = "pass the checkpoint file as MODEL with --arch" if checkpoint else "it has no published weights"
        raise ReproError(f"model {name!r} does not load {'--checkpoint' if checkpoint else '--pretrained'}: "
                         f"{how}") from None
    info = {"source": "checkpoint" if checkpoint else "pretrained", "arch": name, "num_classes": num_classes}
    if checkpoint:
        info.update(path=str(checkpoint), sha256=sha256_file(Path(checkpoint)))
    return model, info


def _is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.list_models(name.split(".")[0]))


def load_model(ref: str, store: Any, device: torch.device, *, arch: Optional[str] = None,
               checkpoint: Optional[str] = None, pretrained: bool = False, num_classes: int = IMAGENET_CLASSES,
               head: Optional[str] = None) -> LoadedModel:
    """Resolve MODEL: a run id (or unique prefix), a checkpoint file (with ``arch``), or a model name."""
    run_id = resolve_run_id(store, ref)
    config = None
    if run_id is not None:
        if arch or checkpoint or pretrained:
            raise ReproError(f"MODEL {ref!r} is a run of the store: --arch/--checkpoint/--pretrained do not apply")
        model, info, config = _load_run(store, run_id, device)
        label = info.get("run_label") or run_id
    elif Path(ref).expanduser().is_file():
        model, info = _load_checkpoint_file(Path(ref).expanduser(), arch, num_classes)
        label = f"{arch} ({Path(ref).name})"
    elif Path(ref).expanduser().exists():
        raise ReproError(f"MODEL {ref!r} is a folder, not a checkpoint file or a run id")
    else:
        model, info = _load_named(ref, pretrained, checkpoint, num_classes)
        label = ref
    model, chosen = with_head(model.to(device).eval(), head)
    info["head"] = chosen
    return LoadedModel(model, info, label, int(info["num_classes"]), run_id, config)


# Pipelines that train at a fixed native size and take no ``image_size`` argument.
PIPELINE_NATIVE_SIZE = {"cifar_crop_flip": 32}


def default_image_size(model: LoadedModel) -> int:
    """The input size the model was built or trained for: a ViT's fixed size, else its run's pipeline, else 224."""
    vit = getattr(model.module, "vit", None) or getattr(getattr(model.module, "model", None), "vit", None)
    if vit is not None:
        return int(vit.patch_embed.img_size[0])
    recipe = (model.config or {}).get("recipe") or {}
    if "image_size" in (recipe.get("pipeline_args") or {}):
        return int(recipe["pipeline_args"]["image_size"])
    return PIPELINE_NATIVE_SIZE.get(recipe.get("pipeline", ""), 224)


def run_normalization(model: LoadedModel) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """A run's own normalisation (CIFAR statistics for CIFAR runs); None: the suites' ImageNet default."""
    norm = ((model.config or {}).get("recipe") or {}).get("normalization")
    return (norm["mean"], norm["std"]) if norm else (None, None)
