"""``repro eval`` (one-command multi-axis evaluation of a model) and ``repro figures`` (every figure of a tier).

``repro eval MODEL --suite clean,imagenet-c,shape-bias,top10`` evaluates one model on the suites of
``repro.evaluate.SUITES`` and writes ONE JSON record (atomically) holding every metric with its protocol, the
model's identity (run id, checkpoint sha256 or pretrained tag; the head used for distilled ViTs), the data, the
options, library versions, commit and device. MODEL is a run id of the store (or a unique prefix of one), a
checkpoint file (``--arch`` names its architecture; the file is a bare state dict or RepDistiller's
``{'model': ...}``), or a registered/timm model name with ``--pretrained`` or ``--checkpoint`` (loaded by its model
family, which understands foreign layouts). ``--synthetic`` writes tiny data in the real layouts (ImageNet val
folder, ImageNet-C, cue-conflict) so that the command runs anywhere.

``repro figures --tier T`` writes the figures into ``figures/``; at the smoke tier it first runs the smoke runs
they need (plan + execute, as ``repro run``) and evaluates the SSTA models on synthetic data.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from repro.errors import ReproError

RECORD_FORMAT = "repro-eval/1"
SMOKE_EVAL_ROOT = Path("data/smoke-eval")
IMAGENET_CLASSES = 1000
SYNTHETIC_IMAGENET_CLASSES = 10  # WNID folders written for a 1000-way model (the first ImageNet classes)


# =============================================================================================== models


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
    from repro.runner import load_run_model

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


# =============================================================================================== data


# Which data folder each suite reads (an EvalData field); a new suite adds one entry.
SUITE_DATA = {"clean": "data_root", "imagenet-c": "imagenet_c_root", "shape-bias": "cue_conflict_root",
              "top10": "data_root"}
DATA_FLAGS = {"data_root": "--data-root", "imagenet_c_root": "--imagenet-c-root",
              "cue_conflict_root": "--cue-conflict-root"}


@dataclass
class EvalData:
    data_root: Optional[Path] = None  # labelled class-per-folder set (ImageNet val: <wnid>/*.JPEG)
    imagenet_c_root: Optional[Path] = None  # <corruption>/<severity>/<wnid>/*.JPEG
    cue_conflict_root: Optional[Path] = None  # <shape>/<shape><i>-<texture><j>.png
    synthetic: bool = False
    corruptions: Optional[list[str]] = None  # None: the 15 benchmark corruptions

    def root_for(self, suite: str) -> Optional[Path]:
        if suite not in SUITE_DATA:
            raise ReproError(f"suite {suite!r} has no data folder option in `repro eval` (known: {sorted(SUITE_DATA)})")
        return getattr(self, SUITE_DATA[suite])

    def check(self, suites: Sequence[str]) -> None:
        missing = sorted({DATA_FLAGS[SUITE_DATA[s]] for s in suites if self.root_for(s) is None})
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
    from repro.data.imagenet_c_synthetic import SMOKE_CORRUPTIONS, SEVERITIES, write_imagenet_c_folder
    from repro.store import atomic_write_json

    size = max(int(image_size), 32)  # imagecorruptions refuses images under 32 px
    names = synthetic_class_names(num_outputs)
    wanted = {SUITE_DATA[s] for s in suites if s in SUITE_DATA}
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


# =============================================================================================== evaluation


@dataclass
class SuiteOptions:
    """Options shared by the suites (``repro.evaluate.predict.EvalOptions``), as recorded."""

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
    """The ``cfg`` mapping of ``repro.evaluate.run_suites`` for these suites, data and options."""
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


def evaluate_record(model: LoadedModel, suites: Sequence[str], data: EvalData, options: SuiteOptions,
                    device: torch.device, other: Optional[LoadedModel] = None, command: str = "",
                    arguments: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the suites on the model and return the record (JSON-ready)."""
    from repro.evaluate import SUITES
    from repro.provenance import environment

    runners = {name: SUITES.get(name) for name in suites}  # unknown names fail before any work
    data.check(list(suites))
    names = distinct_names(model.label, other.label) if other is not None else None
    cfg = suite_config(suites, data, options, other, names)
    results, seconds = {}, {}
    for name, suite in runners.items():
        if options.progress:
            print(f"[{model.label}] suite {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        results[name] = suite(model.module, cfg, device)
        seconds[name] = round(time.perf_counter() - started, 3)
    record_options = _recorded_options(options)
    return {
        "format": RECORD_FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "arguments": arguments,
        "model": model.info,
        "other_model": other.info if other is not None else None,
        "top10_names": list(names) if names else None,
        "suites": results,
        "suite_wall_time_s": seconds,
        "data": data.as_record(),
        "options": record_options,
        **environment(device),
    }


def _recorded_options(options: SuiteOptions) -> dict[str, Any]:
    # JSON round trip, so that a record read back compares equal (tuples become lists).
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}))


def distinct_names(first: str, second: str) -> tuple[str, str]:
    return (first, second) if first != second else (f"{first} (A)", f"{second} (B)")


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


# =============================================================================================== `repro eval`


def _device(name: str) -> torch.device:
    from repro.distributed import resolve_device

    return resolve_device(name)


def _store(runs: Optional[str]) -> Any:
    from repro.store import RunStore

    return RunStore(Path(runs) if runs else None)


def parse_suites(text: str) -> list[str]:
    from repro.evaluate import SUITES

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ReproError("--suite needs at least one suite name")
    for name in names:
        SUITES.get(name)  # one clear error listing the known suites
    return list(dict.fromkeys(names))


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate one model on several suites into one result record",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="run id (or unique prefix), checkpoint file (with --arch), or model name "
                                 "(with --pretrained or --checkpoint)")
    p.add_argument("--suite", default="clean,imagenet-c,shape-bias",
                   help="comma-separated suites: clean, imagenet-c, shape-bias, top10 (default: %(default)s)")
    p.add_argument("--arch", help="architecture of a checkpoint file MODEL (a registered model name)")
    p.add_argument("--checkpoint", help="local weights for a model name (loaded by the model family)")
    p.add_argument("--pretrained", action="store_true", help="a model name's published weights")
    p.add_argument("--num-classes", type=int, default=IMAGENET_CLASSES, help="outputs of a file/name MODEL")
    p.add_argument("--head", choices=sorted(HEADS), help="distilled ViTs: evaluate the cls, dist or averaged head "
                                                          f"(default {DEFAULT_HEAD}, always recorded)")
    p.add_argument("--other", help="second model for top10 (same forms as MODEL)")
    p.add_argument("--other-arch", help="architecture of a checkpoint file --other")
    p.add_argument("--other-checkpoint", help="local weights for a model name --other")
    p.add_argument("--other-head", choices=sorted(HEADS))
    p.add_argument("--data-root", help="labelled class-per-folder set (ImageNet val <wnid>/*.JPEG): clean, top10")
    p.add_argument("--imagenet-c-root", help="ImageNet-C JPEGs: <corruption>/<1-5>/<wnid>/*.JPEG")
    p.add_argument("--cue-conflict-root", help="cue-conflict stimuli: <shape>/<shape><i>-<texture><j>.png")
    p.add_argument("--corruptions", help="comma-separated ImageNet-C corruptions (default: the 15 of mCE)")
    p.add_argument("--synthetic", nargs="?", const="", default=None, metavar="DIR",
                   help="generate tiny data in the real layouts (in DIR, or a temporary folder) instead of the roots")
    p.add_argument("--image-size", type=int, help="centre-crop size (default: the model's input size, else 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="data loader workers (default: min(8, CPUs); 0 with --synthetic)")
    p.add_argument("--label-space", default="auto", choices=["auto", "imagenet", "folder"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast (recorded)")
    p.add_argument("--top10-rule", default="largest-difference")
    p.add_argument("--top10-k", type=int, default=10)
    p.add_argument("--out", help="record file (default: runs/<run id>/eval.json for runs, evals/<name>.json else)")
    p.add_argument("--runs", help="run store folder (default: $REPRO_RUNS or ./runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_record_path(model: LoadedModel, store: Any, synthetic: bool) -> Path:
    """Runs keep their record beside their results; a synthetic evaluation never overwrites a real one."""
    name = "eval-synthetic.json" if synthetic else "eval.json"
    if model.run_id is not None:
        return store.run_dir(model.run_id) / name
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in model.label)
    return Path("evals") / f"{slug}{'-synthetic' if synthetic else ''}.json"


def _data_from_args(args: argparse.Namespace) -> EvalData:
    def folder(value: Optional[str]) -> Optional[Path]:
        return Path(value).expanduser() if value else None

    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    return EvalData(folder(args.data_root), folder(args.imagenet_c_root), folder(args.cue_conflict_root),
                    corruptions=corruptions)


def run_eval(args: argparse.Namespace) -> int:
    from repro.store import atomic_write_json

    suites = parse_suites(args.suite)
    store, device = _store(args.runs), _device(args.device)
    model = load_model(args.model, store, device, arch=args.arch, checkpoint=args.checkpoint,
                       pretrained=args.pretrained, num_classes=args.num_classes, head=args.head)
    other = None
    if args.other:
        other = load_model(args.other, store, device, arch=args.other_arch, checkpoint=args.other_checkpoint,
                           pretrained=args.pretrained, num_classes=args.num_classes, head=args.other_head)
    if "top10" in suites and other is None:
        raise ReproError("suite top10 compares two models: pass --other MODEL (e.g. the SSL teaching assistant)")
    mean, std = run_normalization(model)
    synthetic = args.synthetic is not None
    options = SuiteOptions(batch_size=args.batch_size, image_size=args.image_size or default_image_size(model),
                          num_workers=args.workers if args.workers is not None else (0 if synthetic else None),
                          mean=mean, std=std, label_space=args.label_space, amp=args.amp,
                          progress=not args.no_progress, top10_rule=args.top10_rule, top10_k=args.top10_k)
    command = "repro " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else ""
    arguments = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    if synthetic:
        with synthetic_folder(args.synthetic) as root:
            data = build_synthetic_eval_data(root, model.num_classes, options.image_size, suites,
                                             _data_from_args(args).corruptions)
            record = evaluate_record(model, suites, data, options, device, other, command, arguments)
    else:
        record = evaluate_record(model, suites, _data_from_args(args), options, device, other, command,
                                 arguments)
    out = Path(args.out) if args.out else default_record_path(model, store, synthetic)
    atomic_write_json(out, record)
    print(summary_line(record))
    print(f"wrote {out}")
    return 0


# One headline number per suite for the console; the record holds everything.
HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "clean": lambda r: f"top-1 {r['top1']:.2f}",
    "imagenet-c": lambda r: f"mCE {r['mce']:.1f}{'' if r['complete_benchmark'] else ' (subset)'}",
    "shape-bias": lambda r: "shape bias " + ("n/a" if r["shape_bias"] is None else f"{r['shape_bias']:.3f}"),
    "top10": lambda r: "top-10 accuracy " + ", ".join(f"{k} {v:.1f}" for k, v in r["accuracy"].items()),
}


def summary_line(record: dict[str, Any]) -> str:
    parts = [HEADLINES[name](result) if name in HEADLINES else name for name, result in record["suites"].items()]
    return f"{record['model'].get('run_id') or record['model'].get('arch')}: " + "; ".join(parts)


# =============================================================================================== `repro figures`

FIGURE1_SPEC = "wttm/figure1-entropy"
TRANSFER_SPEC = "ssta/transfer"
# Where the SSTA analysis models (teacher, TA, students) come from: the first of these specs that exists.
ANALYSIS_SPECS = ("ssta/imagenet-main", "ssta/transfer")


@dataclass
class FigureContext:
    args: argparse.Namespace
    tier: str
    store: Any
    device: torch.device
    out_dir: Path
    stamp: str
    run_first: bool
    plans: dict[str, Any] = field(default_factory=dict)
    executed: set[str] = field(default_factory=set)

    def plan(self, spec_id: str) -> Any:
        """The spec's plan at this tier; run first (once) when the command runs what it needs."""
        from repro.plan import make_plan
        from repro.runner import execute
        from repro.spec import load_spec

        if spec_id not in self.plans:
            self.plans[spec_id] = make_plan(load_spec(spec_id), self.tier, self.args.seeds,
                                            teacher_gate=not self.args.no_teacher_gate)
        if self.run_first and spec_id not in self.executed:
            self.executed.add(spec_id)
            started = time.perf_counter()
            summary = execute(self.plans[spec_id], self.store, self.device, progress=not self.args.no_progress)
            print(f"{spec_id} [{self.tier}]: {len(summary.done)} trained, {len(summary.cached)} cached, "
                  f"{len(summary.failed)} failed, {len(summary.blocked)} blocked "
                  f"({time.perf_counter() - started:.0f} s)")
        return self.plans[spec_id]


FigureStep = Callable[[FigureContext], list[Path]]
FIGURE_STEPS: dict[str, FigureStep] = {}
# Reported-vs-reproduced last: it then sees the runs the other steps have just finished.
STEP_ORDER = ("entropy", "transfer", "ssta-analyses", "reported-vs-reproduced")


def figure_step(name: str) -> Callable[[FigureStep], FigureStep]:
    def add(fn: FigureStep) -> FigureStep:
        FIGURE_STEPS[name] = fn
        return fn

    return add


@figure_step("reported-vs-reproduced")
def reported_vs_reproduced_step(ctx: FigureContext) -> list[Path]:
    """One figure per table output, from ``tables/<output>.csv`` when it is of this tier, else from the store.
    An output whose specs do not load is skipped with its error (the other figures are still drawn)."""
    from repro.render.figures import REPORTED_VS_REPRODUCED, plot_reported_vs_reproduced
    from repro.spec import all_outputs

    outputs = [o.strip() for o in ctx.args.outputs.split(",") if o.strip()] if ctx.args.outputs else all_outputs()
    written = []
    for output in outputs:
        try:
            frame, source = output_frame(output, ctx)
        except ReproError as err:
            print(f"reported-vs-reproduced: {output} skipped: {err}")
            continue
        title = f"{output}: reported vs reproduced top-1 ({ctx.tier} tier)"
        if ctx.tier != "full":
            title += "\n(not comparable with the paper at this tier)"
        path = ctx.out_dir / REPORTED_VS_REPRODUCED.format(output=output)
        written.append(plot_reported_vs_reproduced(frame, path, f"{ctx.stamp}  source={source}", title))
    return written


def output_frame(output: str, ctx: FigureContext) -> tuple[Any, str]:
    """The output's cells as the table CSV has them: the CSV if it is of this tier, else recomputed."""
    import pandas as pd

    from repro.compare import compare_plan
    from repro.render.figures import read_table_csv
    from repro.render.tables import CSV_COLUMNS, csv_rows
    from repro.spec import specs_for_output

    csv_path = Path(ctx.args.tables) / f"{output}.csv"
    if csv_path.is_file():
        frame = read_table_csv(csv_path)
        if len(frame) and set(frame["tier"]) == {ctx.tier}:
            return frame, str(csv_path)
    rows = []
    for spec_id in specs_for_output(output):
        rows += csv_rows(compare_plan(ctx.plans.get(spec_id) or _plan_only(ctx, spec_id), ctx.store))
    return pd.DataFrame(rows, columns=CSV_COLUMNS), "run store"


def _plan_only(ctx: FigureContext, spec_id: str) -> Any:
    from repro.plan import make_plan
    from repro.spec import load_spec

    return make_plan(load_spec(spec_id), ctx.tier, ctx.args.seeds, teacher_gate=not ctx.args.no_teacher_gate)


@figure_step("entropy")
def entropy_step(ctx: FigureContext) -> list[Path]:
    """WTTM Figure 1 from the entropy logged by the runs of spec wttm/figure1-entropy."""
    from repro.render.figures import ENTROPY_FIGURE, gather_entropy_curves, plot_entropy_curves

    plan = ctx.plan(FIGURE1_SPEC)
    curves = gather_entropy_curves(plan, ctx.store)
    title = "WTTM Figure 1: student's mean predictive entropy H(q) per epoch (KD λ=0.9, TTM β=36, WTTM β=36/Ū; T=4)"
    return [plot_entropy_curves(curves, ctx.out_dir / ENTROPY_FIGURE, ctx.stamp, title)]


@figure_step("transfer")
def transfer_step(ctx: FigureContext) -> list[Path]:
    """SSTA transfer: CIFAR-10/100 fine-tuning accuracy of teacher, TA and students (spec ssta/transfer)."""
    from repro.compare import compare_plan
    from repro.render.figures import TRANSFER_FIGURE, gather_transfer, plot_transfer

    plan = ctx.plan(TRANSFER_SPEC)
    names = {key: plan.spec.model_def(key).arch or key for key in plan.spec.models}
    frame = gather_transfer(compare_plan(plan, ctx.store), ctx.store, names)
    substituted = plan.spec.tier_models.get(ctx.tier)
    title = f"SSTA transfer: top-1 after fine-tuning on CIFAR ({ctx.tier} tier)"
    if substituted:
        title += "\nmodels substituted at this tier: " + ", ".join(sorted(set(substituted.values())))
    return [plot_transfer(frame, ctx.out_dir / TRANSFER_FIGURE, ctx.stamp, title)]


# ----------------------------------------------------------------------------------------------- SSTA analyses


@dataclass
class AnalysisModel:
    label: str
    run_id: str
    role: str  # "teacher", "assistant" or "student"


def analysis_models(plan: Any, store: Any) -> list[AnalysisModel]:
    """Teacher, teaching assistant(s) and students of a spec's cells (seed 0 of each), finished runs only,
    each run once, in the order the cells name them."""
    models: dict[str, AnalysisModel] = {}

    def add(run_id: Optional[str], label: str, role: str) -> None:
        if run_id and run_id not in models and store.is_done(run_id):
            models[run_id] = AnalysisModel(label, run_id, role)

    def name(key: Optional[str]) -> str:
        # Display only: timm's "_patch16_224" suffix is the same for every SSTA model and crowds the legends.
        return plan.spec.arch_of(key).replace("_patch16_224", "").replace("_p16_224", "") if key else "?"

    for cell_runs in plan.cells:
        cell = cell_runs.cell
        for run_id in cell_runs.run_ids[:1]:
            config = plan.runs[run_id].config
            add((config.get("teacher") or {}).get("run"), f"teacher {name(cell.teacher)}", "teacher")
            for ref in (config.get("assistants") or {}).values():
                add(ref["run"], f"TA {name(cell.assistant)}", "assistant")
            if cell_runs.method.role == "teacher":
                add(run_id, f"teacher {name(cell.teacher)}", "teacher")
            else:
                add(run_id, f"{cell.method} {name(cell.student)}", "student")
    return list(models.values())


def top10_pair(models: Sequence[AnalysisModel]) -> Optional[tuple[AnalysisModel, AnalysisModel]]:
    """SSTA's top-10 figure compares the supervised teacher with the self-supervised TA; without a TA (or a
    teacher), the first two models of the spec stand in."""
    teachers = [m for m in models if m.role == "teacher"]
    assistants = [m for m in models if m.role == "assistant"]
    if teachers and assistants:
        return teachers[0], assistants[0]
    return (models[0], models[1]) if len(models) >= 2 else None


def analysis_spec_id(ctx: FigureContext) -> str:
    """``--analysis-spec``, else the first of ANALYSIS_SPECS that exists and loads (a spec being written may not
    load yet: the next one stands in, and the console says so)."""
    from repro.spec import all_spec_ids, load_spec

    if ctx.args.analysis_spec:
        return ctx.args.analysis_spec
    known = set(all_spec_ids())
    for spec_id in ANALYSIS_SPECS:
        if spec_id not in known:
            continue
        try:
            load_spec(spec_id)
        except ReproError as err:
            print(f"SSTA analyses: {spec_id} does not load ({err}); trying the next model source")
            continue
        return spec_id
    raise ReproError(f"SSTA analyses: none of {', '.join(ANALYSIS_SPECS)} loads; pass --analysis-spec")


def analysis_data(ctx: FigureContext, num_outputs: int, image_size: int, suites: Sequence[str]) -> EvalData:
    """Synthetic data at the smoke tier (or with --synthetic-data), else the folders given on the command line."""
    if ctx.tier == "smoke" or ctx.args.synthetic_data:
        root = Path(ctx.args.synthetic_root) / f"{num_outputs}way-{image_size}px"
        return build_synthetic_eval_data(root, num_outputs, image_size, suites)
    return _data_from_args(ctx.args)


def cached_record(path: Path, data: EvalData, suites: Sequence[str], options: SuiteOptions,
                  top10_names: Optional[tuple[str, str]]) -> Optional[dict[str, Any]]:
    """A record already written for the same data, options, suites and top-10 names (a finished run's weights
    never change, so the numbers would be the same)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = (record.get("data") == data.as_record() and record.get("options") == _recorded_options(options)
            and set(suites) <= set(record.get("suites", {}))
            and record.get("top10_names") == (list(top10_names) if top10_names else None))
    return record if same else None


def evaluate_analysis_model(ctx: FigureContext, entry: AnalysisModel, other: Optional[AnalysisModel]
                            ) -> Optional[dict[str, Any]]:
    """The record of one SSTA model: ImageNet-C, shape bias (1000-way models only) and, for the teacher of the
    top-10 pair, top10 against the TA. Skipped suites are reported on the console with the reason."""
    from repro.store import atomic_write_json

    model = load_model(entry.run_id, ctx.store, ctx.device)
    model.label = entry.label  # the figure's short name, not the run's long label
    suites = ["imagenet-c"]
    if model.num_classes == IMAGENET_CLASSES:
        suites.append("shape-bias")
    else:
        print(f"  {entry.label}: shape bias skipped (it needs 1000-way ImageNet outputs, the model has "
              f"{model.num_classes})")
    other_model = None
    if other is not None:
        other_model = load_model(other.run_id, ctx.store, ctx.device)
        other_model.label = other.label
        suites.append("top10")
    image_size = default_image_size(model)
    data = analysis_data(ctx, model.num_classes, image_size, suites)
    missing = [s for s in suites if data.root_for(s) is None]
    if missing:
        print(f"  {entry.label}: {', '.join(missing)} skipped: pass "
              f"{' '.join(sorted({DATA_FLAGS[SUITE_DATA[s]] for s in missing}))}")
        suites = [s for s in suites if s not in missing]
    if not suites:
        return None
    path = default_record_path(model, ctx.store, data.synthetic)
    mean, std = run_normalization(model)
    options = SuiteOptions(image_size=image_size, mean=mean, std=std, progress=not ctx.args.no_progress,
                           num_workers=0 if data.synthetic else None)
    names = distinct_names(model.label, other_model.label) if other_model is not None else None
    record = cached_record(path, data, suites, options, names)
    if record is None:
        record = evaluate_record(model, suites, data, options, ctx.device, other_model,
                                 command=f"repro figures --tier {ctx.tier}")
        atomic_write_json(path, record)
    return record


@figure_step("ssta-analyses")
def ssta_analyses_step(ctx: FigureContext) -> list[Path]:
    """Shape bias, ImageNet-C and top-10 of the SSTA models (teacher, TA, students of the analysis spec)."""
    from repro.render.analysis_plots import plot_imagenet_c, plot_shape_bias, plot_top10
    from repro.render.figures import (
        IMAGENET_C_FIGURE,
        SHAPE_BIAS_FIGURE,
        TOP10_FIGURE,
        gather_imagenet_c,
        gather_shape_bias,
        gather_top10,
    )

    spec_id = analysis_spec_id(ctx)
    plan = ctx.plan(spec_id)
    models = analysis_models(plan, ctx.store)
    if not models:
        print(f"SSTA analyses: no finished run in {spec_id} [{ctx.tier}] yet; run it first")
        return []
    pair = top10_pair(models)
    records = {}
    for entry in models:
        other = pair[1] if pair is not None and entry is pair[0] else None
        record = evaluate_analysis_model(ctx, entry, other)
        if record is not None:
            records[entry.label] = record
    stamp = f"{ctx.stamp}  models={spec_id}" + ("  data=synthetic" if ctx.tier == "smoke" else "")
    written = []
    per_class, overall = gather_shape_bias(records)
    if per_class:
        written.append(plot_shape_bias(per_class, ctx.out_dir / SHAPE_BIAS_FIGURE, stamp, overall,
                                       title=f"Shape bias on cue-conflict stimuli ({ctx.tier} tier)"))
    errors = gather_imagenet_c(records)
    if errors:
        written.append(plot_imagenet_c(errors, ctx.out_dir / IMAGENET_C_FIGURE, stamp,
                                       metric="Corruption error CE (% of AlexNet's)",
                                       title=f"ImageNet-C corruption error per corruption ({ctx.tier} tier)"))
    table = gather_top10(records)
    if table is not None:
        written.append(plot_top10(table, ctx.out_dir / TOP10_FIGURE, stamp,
                                  title=f"Top-10 categories: correct images per class ({ctx.tier} tier)"))
    for name, figure_name in (("shape bias", SHAPE_BIAS_FIGURE), ("ImageNet-C", IMAGENET_C_FIGURE),
                              ("top-10", TOP10_FIGURE)):
        if not any(path.name == figure_name for path in written):
            print(f"SSTA analyses: no {name} result, {figure_name} not written")
    return written


def add_figures_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("figures", help="write every figure of a tier into figures/ (PNG)")
    p.add_argument("--tier", choices=["smoke", "proxy", "full"], default="full")
    p.add_argument("--only", help=f"comma-separated figure groups: {', '.join(FIGURE_STEPS)} (default: all)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--run", dest="run_first", action="store_true", default=None,
                      help="run the pending runs the figures need first (default at the smoke tier only)")
    runs.add_argument("--no-run", dest="run_first", action="store_false", help="draw from the store as it is")
    p.add_argument("--outputs", help="table outputs for reported-vs-reproduced (default: every output)")
    p.add_argument("--figures", default="figures", help="output folder (default: %(default)s)")
    p.add_argument("--tables", default="tables", help="where the table CSVs are read from")
    p.add_argument("--runs", help="run store folder (default: $REPRO_RUNS or ./runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--no-teacher-gate", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--analysis-spec", help=f"spec whose models the SSTA analyses evaluate (default: the first of "
                                           f"{', '.join(ANALYSIS_SPECS)} that exists)")
    p.add_argument("--data-root", help="ImageNet val folder (top-10 analysis)")
    p.add_argument("--imagenet-c-root", help="ImageNet-C folder")
    p.add_argument("--cue-conflict-root", help="cue-conflict stimuli folder")
    p.add_argument("--corruptions", help="ImageNet-C corruptions (default: the 15 of mCE)")
    p.add_argument("--synthetic-data", action="store_true", help="evaluate on synthetic data at any tier")
    p.add_argument("--synthetic-root", default=str(SMOKE_EVAL_ROOT), help="where synthetic evaluation data goes")
    return p


def run_figures(args: argparse.Namespace) -> int:
    from repro.render.figures import figure_stamp

    steps = list(STEP_ORDER) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in FIGURE_STEPS]
    if unknown:
        raise ReproError(f"--only: unknown figure group(s) {unknown}; known: {', '.join(FIGURE_STEPS)}")
    run_first = args.run_first if args.run_first is not None else args.tier == "smoke"
    ctx = FigureContext(args, args.tier, _store(args.runs), _device(args.device), Path(args.figures),
                        figure_stamp(args.tier), run_first)
    started = time.perf_counter()
    written = []
    for step in steps:
        step_started = time.perf_counter()
        paths = FIGURE_STEPS[step](ctx)
        written += paths
        print(f"{step}: {len(paths)} figure(s) in {time.perf_counter() - step_started:.0f} s")
    for path in written:
        print(f"wrote {path}")
    print(f"figures [{args.tier}]: {len(written)} written in {time.perf_counter() - started:.0f} s")
    return 0

