"""``python -m bench`` (``make bench``): KD training throughput of the official loop's structure against this suite's fast paths.

One KD step (the CRD-style baseline of wttm.md 1.4: 0.1 CE + 0.9 KD at T=4, SGD lr 0.05 / momentum 0.9 / wd 5e-4,
batch 64) is timed for each (teacher -> student pair, path):

- ``reference``: the RepDistiller/TTM loop's structure (wttm.md 1.6, 2.1): a torchvision ``DataLoader`` with PIL
  transforms ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in worker
  processes, both networks called with ``is_feat=True``, the teacher forward on every step, float32, NCHW,
  denormals not flushed.
- ``reference_flush``: the same with denormals flushed to zero, so the ratios separate what the data path and the
  cache gain from what flushing alone gains (randomly initialised deep ResNets produce denormals on CPU).
- ``fast_live``: our data path (``TensorLoader``: device-resident uint8 images, batched crop+flip) + ``Distiller``
  with the live teacher: what the data path alone gains.
- ``fast_cold`` / ``fast_warm``: the same with the exact teacher-output cache, empty at the start (every lookup
  misses, runs the teacher and stores) / filled beforehand for every (image, view) the timed steps visit (the
  loader's order is a function of (seed, epoch), so one pass over the same batches fills exactly those).

Every (pair, path) runs in a fresh process: flush-denormal is a per-thread CPU flag that OpenMP threads inherit
only when they are created, so switching it inside one process would leave the thread pool at the old setting
(and the peak RSS would mix the paths). Throughput is the median over the timed steps of images/s per step,
after warm-up steps; the step time covers fetching the batch, both forwards, the losses, backward and the SGD
step. Teacher weights are random (seeded): the speed does not depend on trained values, except through
denormals, which is why the flush setting is stated for every path.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from repro.core.errors import ReproError

# -- the benchmarked recipe (wttm.md 1.4 and 2.1) -----------------------------------------------------------------
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CE_WEIGHT, KD_WEIGHT, KD_TEMPERATURE = 0.1, 0.9, 4.0
SGD_ARGS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RECIPE_TEXT = "0.1 CE + 0.9 KD (T=4); SGD lr 0.05, momentum 0.9, weight decay 5e-4"

DEFAULT_PAIRS = ("resnet56:resnet20", "resnet32x4:resnet8x4")
DEFAULT_PATHS = ("reference", "reference_flush", "fast_live", "fast_cold", "fast_warm")
DEFAULT_OUTPUT = Path("bench") / "results.json"
# Synthetic stand-in for CIFAR-100 when the real files are absent: 100 classes x 50 images in the real layout.
SYNTHETIC_ARGS = dict(num_classes=100, classes_used=100, train_per_class=50, test_per_class=1, seed=0)
QUICK_SYNTHETIC_ARGS = dict(num_classes=100, classes_used=10, train_per_class=10, test_per_class=1, seed=0)


@dataclass(frozen=True)
class RunSizes:
    steps: int
    warmup: int
    batch_size: int


FULL_SIZES = RunSizes(steps=15, warmup=2, batch_size=64)  # sized for ~10 min, both pairs, 2 idle cores (estimated)
QUICK_SIZES = RunSizes(steps=3, warmup=1, batch_size=16)
QUICK_PAIRS = ("resnet8:resnet8",)
CIFAR100_TRAIN_IMAGES = 50000


# -- what a path is ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSettings:
    """Everything that distinguishes one path's numbers; written next to every result."""

    loader: str  # a key of LOADERS
    teacher: str  # a key of TEACHER_SOURCES
    flush_denormal: bool
    channels_last: bool
    num_workers: int = 0  # DataLoader worker processes (the reference loader only)
    cache_dtype: Optional[str] = None  # teacher-output cache dtype (cached teachers only)
    precision: str = "fp32"  # every path runs in float32


def path_settings(workers: int, channels_last: bool, cache_dtype: str) -> dict[str, PathSettings]:
    """The benchmarked paths; the fast ones use the recipe defaults of a real run (``repro.harness.spec.Recipe``)."""
    from repro.harness.spec import Recipe

    fast_flush = bool(Recipe.model_fields["flush_denormal"].default)
    reference = PathSettings(loader="torchvision", teacher="live", flush_denormal=False, channels_last=False,
                             num_workers=workers)
    fast = PathSettings(loader="tensor", teacher="live", flush_denormal=fast_flush, channels_last=channels_last)
    return {
        "reference": reference,
        "reference_flush": replace(reference, flush_denormal=True),
        "fast_live": fast,
        "fast_cold": replace(fast, teacher="cache_cold", cache_dtype=cache_dtype),
        "fast_warm": replace(fast, teacher="cache_warm", cache_dtype=cache_dtype),
    }


LOADER_TEXT = {
    "torchvision": "torchvision DataLoader(shuffle=True) over PIL images: RandomCrop(32, padding=4), "
                   "RandomHorizontalFlip, ToTensor, Normalize in {num_workers} worker processes",
    "tensor": "repro TensorLoader: uint8 images resident on the device, batched crop+flip, no workers",
}
TEACHER_TEXT = {
    "live": "teacher forward under no_grad on every step",
    "cache_cold": "teacher-output cache ({cache_dtype}), empty at the start: every lookup misses, runs the "
                  "teacher and stores",
    "cache_warm": "teacher-output cache ({cache_dtype}), filled beforehand for every (image, view) the timed "
                  "steps visit: no teacher forward",
}


def describe(settings: PathSettings) -> str:
    values = asdict(settings)
    return "; ".join([LOADER_TEXT[settings.loader].format(**values), TEACHER_TEXT[settings.teacher].format(**values),
                      f"flush-denormal {'on' if settings.flush_denormal else 'off'}",
                      "channels_last" if settings.channels_last else "NCHW", settings.precision])


# -- data -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    kind: str  # a key of DATA_READERS
    root: str
    note: str


def _read_cifar100(root: Path) -> Any:
    from repro.data.cifar import read_cifar

    return read_cifar(root, "train", "cifar100", download=False)


def _read_synthetic(root: Path) -> Any:
    from repro.data.synthetic import read_synthetic_cifar

    return read_synthetic_cifar(root, "train", "cifar100")


DATA_READERS: dict[str, Callable[[Path], Any]] = {"cifar100": _read_cifar100, "synthetic": _read_synthetic}


def prepare_data(data_root: Path, quick: bool) -> DataSource:
    """The real CIFAR-100 training set when ``data_root`` holds it, else synthetic data in the same layout."""
    from repro.data.cifar import SYNTHETIC_MANIFEST, get_layout
    from repro.data.synthetic import ensure_synthetic_cifar

    layout = get_layout("cifar100")
    real = data_root / layout.base_folder
    if not quick and (real / layout.split_files("train")[0]).is_file() and not (real / SYNTHETIC_MANIFEST).exists():
        return DataSource("cifar100", str(data_root), f"CIFAR-100 train split from {real}")
    args = QUICK_SYNTHETIC_ARGS if quick else SYNTHETIC_ARGS
    root = data_root / ("bench-synthetic-quick" if quick else "bench-synthetic")
    ensure_synthetic_cifar(root, variant="cifar100", **args)
    note = (f"synthetic CIFAR-100 layout (repro.data.synthetic, {args['classes_used']} classes x "
            f"{args['train_per_class']} images) in {root}: real CIFAR-100 not found in {real}")
    return DataSource("synthetic", str(root), note)


class PILImages(torch.utils.data.Dataset):
    """torchvision's CIFAR ``__getitem__``: an HWC uint8 array -> PIL image -> transform, label as int."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], Any]) -> None:
        self.images = np.ascontiguousarray(images_nchw.permute(0, 2, 3, 1).numpy())
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def official_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


# -- one (pair, path) job ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    teacher: str
    student: str
    path: str
    settings: PathSettings
    data: DataSource
    sizes: RunSizes
    device: str
    threads: Optional[int]
    seed: int = 0


Step = Callable[[], int]  # runs one training step, returns the number of images it trained on


@dataclass
class Harness:
    step: Step
    cached: Any = None  # the CachedTeacher when the path uses the teacher-output cache
    cache_path: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)


class CallCounter:
    """Counts the teacher's forward calls and images through a forward pre-hook."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.images = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.images += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.images = 0


def _sgd(student: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(student.parameters(), **SGD_ARGS)


def _forever(loader: Any) -> Iterator[Any]:
    """Epoch after epoch; a new pass over a DataLoader restarts its workers, as in the official loop."""
    for epoch in itertools.count(1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def reference_harness(job: Job, data: Any, teacher: nn.Module, student: nn.Module, device: torch.device,
                      cache_dir: Path) -> Harness:
    """The official ``train_distill`` step (KD baseline): batch to device, student and teacher forwards with
    ``is_feat=True``, CE + KD, zero_grad / backward / step, ``loss.item()`` for the meters."""
    from torch.utils.data import DataLoader

    from repro.losses import kd_loss

    dataset = PILImages(data.images, data.labels, official_transform())
    loader = DataLoader(dataset, batch_size=job.sizes.batch_size, shuffle=True,
                        num_workers=job.settings.num_workers, generator=torch.Generator().manual_seed(job.seed))
    batches = _forever(loader)
    optimizer = _sgd(student)

    def step() -> int:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        _, logits = student(images, is_feat=True)
        with torch.no_grad():
            _, teacher_logits = teacher(images, is_feat=True)
        loss = CE_WEIGHT * F.cross_entropy(logits, labels) + KD_WEIGHT * kd_loss(logits, teacher_logits,
                                                                                  KD_TEMPERATURE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        float(loss.detach())  # the official loop's loss.item() for its meters (a sync point)
        return int(labels.shape[0])

    return Harness(step)


def _open_cache(job: Job, data: Any, teacher: nn.Module, device: torch.device, cache_dir: Path) -> Any:
    from repro.data.teacher_cache import TeacherCache, cached_teacher_fn

    key = f"bench:{job.teacher}:random-init-seed{job.seed}|{job.settings.precision}|cl={job.settings.channels_last}"
    cache = TeacherCache.for_dataset(cache_dir, teacher_key=key, dataset=data, mean=CIFAR100_MEAN,
                                     std=CIFAR100_STD, dtype=job.settings.cache_dtype)
    return cached_teacher_fn(cache, teacher, device)


def _live_teacher(job: Job, data: Any, teacher: nn.Module, device: torch.device, cache_dir: Path,
                  loader: Any) -> Any:
    return None  # the Distiller runs its teacher on every batch


def _cold_cache(job: Job, data: Any, teacher: nn.Module, device: torch.device, cache_dir: Path, loader: Any) -> Any:
    return _open_cache(job, data, teacher, device, cache_dir)


def _warm_cache(job: Job, data: Any, teacher: nn.Module, device: torch.device, cache_dir: Path, loader: Any) -> Any:
    cached = _open_cache(job, data, teacher, device, cache_dir)
    # The loader replays the same batches from a fresh iterator, so this fills exactly what the job will look up.
    for batch in itertools.islice(_forever(loader), job.sizes.warmup + job.sizes.steps):
        cached(batch, False, False)
    cached.cache.flush()
    return cached


TeacherSource = Callable[[Job, Any, nn.Module, torch.device, Path, Any], Any]
TEACHER_SOURCES: dict[str, TeacherSource] = {"live": _live_teacher, "cache_cold": _cold_cache,
                                             "cache_warm": _warm_cache}


def fast_harness(job: Job, data: Any, teacher: nn.Module, student: nn.Module, device: torch.device,
                 cache_dir: Path) -> Harness:
    """This suite's training step: ``TensorLoader`` batches through ``Distiller.forward_train`` (as in
    ``repro.train.loop.Trainer``), with the teacher live or behind the teacher-output cache."""
    from repro.data.loader import TensorLoader
    from repro.methods import Distiller, TermContext, get_term

    loader = TensorLoader(data, job.sizes.batch_size, CIFAR100_MEAN, CIFAR100_STD, train=True, augment=True,
                          seed=job.seed, device=device, channels_last=job.settings.channels_last)
    cached = TEACHER_SOURCES[job.settings.teacher](job, data, teacher, device, cache_dir, loader)
    ctx = TermContext(student=student, teacher=teacher, num_classes=data.num_classes,
                      train_labels=data.labels.to(device), device=device, epochs=1)
    terms = {"ce": (CE_WEIGHT, get_term("ce")(ctx)), "kd": (KD_WEIGHT, get_term("kd")(ctx, temperature=KD_TEMPERATURE))}
    distiller = Distiller(student, teacher, terms, teacher_fn=cached).train()
    batches = _forever(loader)
    optimizer = _sgd(student)

    def step() -> int:
        batch = next(batches)
        _, losses = distiller.forward_train(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        float(total.detach())  # the Trainer logs every term (a sync point)
        return int(batch.labels.shape[0])

    harness = Harness(step, cached=cached, cache_path=cached.cache.path if cached is not None else None)
    if cached is not None:
        harness.extra["cache_filled_fraction_before_timing"] = cached.cache.filled_fraction()
    return harness


HarnessFactory = Callable[[Job, Any, nn.Module, nn.Module, torch.device, Path], Harness]
LOADERS: dict[str, HarnessFactory] = {"torchvision": reference_harness, "tensor": fast_harness}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a step's time covers its kernels (a no-op on CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM where /proc has it (it restarts at exec, unlike
    ru_maxrss, which would include the parent it was forked from), else ``resource.getrusage``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _file_bytes(path: Optional[Path]) -> dict[str, int]:
    if path is None or not path.is_file():
        return {}
    stat = path.stat()
    return {"cache_file_bytes": stat.st_size, "cache_file_allocated_bytes": stat.st_blocks * 512}


def run_job(job: Job) -> dict[str, Any]:
    """Time one (pair, path); meant to run in a fresh process (see the module docstring)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    # First, before any parallel region creates the thread pool, so that every pool thread inherits the flag.
    flush_supported = torch.set_flush_denormal(job.settings.flush_denormal)
    from repro.models import create_model

    device = torch.device(job.device)
    data = DATA_READERS[job.data.kind](Path(job.data.root))
    torch.manual_seed(job.seed)  # the same initial teacher and student in every path
    teacher = create_model(job.teacher, num_classes=data.num_classes).to(device).eval()
    student = create_model(job.student, num_classes=data.num_classes).to(device).train()
    if job.settings.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    counter = CallCounter(teacher)
    with tempfile.TemporaryDirectory(prefix="repro-bench-") as cache_dir:
        harness = LOADERS[job.settings.loader](job, data, teacher, student, device, Path(cache_dir))
        timed = _time_steps(harness, job.sizes, device, counter)
        timed.update(_file_bytes(harness.cache_path))
    return {"pair": f"{job.teacher}->{job.student}", "path": job.path, **timed, **harness.extra,
            "settings": {**asdict(job.settings), "threads": torch.get_num_threads(),
                         "flush_denormal_supported": bool(flush_supported), "device": str(device)},
            "description": describe(job.settings), "rss_peak_mb": round(peak_rss_mb(), 1)}


def _time_steps(harness: Harness, sizes: RunSizes, device: torch.device, counter: CallCounter) -> dict[str, Any]:
    for _ in range(sizes.warmup):
        harness.step()
    synchronize(device)
    counter.reset()
    if harness.cached is not None:
        harness.cached.hits = harness.cached.misses = 0
    load_before = os.getloadavg()[0]
    seconds, images = [], []
    for _ in range(sizes.steps):
        start = time.perf_counter()
        images.append(harness.step())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    result = {"step_seconds": [round(s, 5) for s in seconds], "step_images": images,
              "teacher_calls_timed": counter.calls, "teacher_images_timed": counter.images,
              "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if harness.cached is not None:
        result.update(cache_hits_timed=harness.cached.hits, cache_misses_timed=harness.cached.misses)
    return result


SUMMED = ("teacher_calls_timed", "teacher_images_timed", "cache_hits_timed", "cache_misses_timed")


def merge_rounds(rows: list[dict[str, Any]], sizes: RunSizes) -> dict[str, Any]:
    """One result from the rounds of a (pair, path): the median and mean over all their timed steps."""
    seconds = [s for row in rows for s in row["step_seconds"]]
    images = [n for row in rows for n in row["step_images"]]
    merged = {key: value for key, value in rows[0].items() if key not in ("step_seconds", "step_images")}
    merged.update(
        img_per_s=round(statistics.median(n / s for n, s in zip(images, seconds)), 2),
        img_per_s_mean=round(sum(images) / sum(seconds), 2),
        step_ms_median=round(1000 * statistics.median(seconds), 2),
        img_per_s_by_round=[round(statistics.median(n / s for n, s in zip(row["step_images"], row["step_seconds"])), 2)
                            for row in rows],
        rounds=len(rows), steps=sizes.steps, warmup=sizes.warmup, batch_size=sizes.batch_size,
        load_avg_1min=[value for row in rows for value in row["load_avg_1min"]],
        rss_peak_mb=max(row["rss_peak_mb"] for row in rows))
    for key in SUMMED:
        if key in rows[0]:
            merged[key] = sum(row[key] for row in rows)
    return merged


def _run_here(job: Job) -> dict[str, Any]:
    """``run_job`` in this process (test mode), putting the process-wide numeric switches back afterwards."""
    threads = torch.get_num_threads()
    try:
        return run_job(job)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # torch's default: torch has no getter for the previous value


def _run_isolated(job: Job) -> dict[str, Any]:
    # spawn, not fork: a fresh interpreter whose thread pool is created after its own flush-denormal setting.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_job, job).result()


# -- the whole benchmark ----------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    from repro.core.env import environment

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = environment(device)
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads_default": torch.get_num_threads(), "device": env["device"],
            "device_name": env["device_name"], "versions": env["versions"], "commit": env["commit"],
            "hostname": env["hostname"], "platform": platform.platform()}


def expected_cache_bytes(num_images: int, num_classes: int, dtype: str) -> int:
    """Teacher-output cache size: one filled flag (1 byte) plus ``num_classes`` logits per (image, view)."""
    from repro.data.loader import num_views

    itemsize = np.dtype(dtype).itemsize
    return num_images * num_views() * (1 + num_classes * itemsize)


def cache_size_note(dtype: str) -> dict[str, Any]:
    from repro.data.loader import num_views

    size = expected_cache_bytes(CIFAR100_TRAIN_IMAGES, 100, dtype)
    itemsize = np.dtype(dtype).itemsize
    return {"cifar100_bytes": size, "dtype": dtype,
            "formula": f"{CIFAR100_TRAIN_IMAGES} images x {num_views()} views x (100 logits x {itemsize} B "
                       f"+ 1 flag B) = {size / 1e9:.2f} GB, memory-mapped and sparse until filled; the pages a "
                       f"run touches count in its RSS as reclaimable file-backed memory"}


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pair: every path's img/s over the reference's and over reference_flush's."""
    table: dict[str, dict[str, float]] = {}
    for pair in dict.fromkeys(r["pair"] for r in results):
        rows = {r["path"]: r["img_per_s"] for r in results if r["pair"] == pair}
        for base in ("reference", "reference_flush"):
            if rows.get(base):
                for path, rate in rows.items():
                    if path != base:
                        table.setdefault(pair, {})[f"{path}/{base}"] = round(rate / rows[base], 2)
    return table


def format_table(results: list[dict[str, Any]]) -> str:
    header = f"{'pair':24s} {'path':16s} {'img/s':>9s} {'x ref':>7s} {'x ref_flush':>11s} {'RSS MiB':>8s}"
    lines = [header, "-" * len(header)]
    for r in results:
        rows = {x["path"]: x["img_per_s"] for x in results if x["pair"] == r["pair"]}
        rel = [f"{r['img_per_s'] / rows[b]:.2f}" if rows.get(b) else "-" for b in ("reference", "reference_flush")]
        lines.append(f"{r['pair']:24s} {r['path']:16s} {r['img_per_s']:9.1f} {rel[0]:>7s} {rel[1]:>11s} "
                     f"{r['rss_peak_mb']:8.0f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class BenchConfig:
    pairs: tuple[tuple[str, str], ...]
    paths: tuple[str, ...]
    sizes: RunSizes
    workers: int
    channels_last: bool
    cache_dtype: str
    threads: Optional[int]
    device: str
    data_root: Path
    output: Path
    quick: bool
    isolate: bool
    rounds: int = 1
    seed: int = 0


def benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (pair, path), write ``config.output`` atomically, return what was written."""
    from repro.core.io import atomic_write_json

    device = torch.device(config.device)
    settings = path_settings(config.workers, config.channels_last, config.cache_dtype)
    data = prepare_data(config.data_root, config.quick)
    log(f"data: {data.note}")
    run = _run_isolated if config.isolate else _run_here
    started, raw = time.time(), {}
    # Rounds interleave the paths, so load that drifts on a shared machine hits every path alike.
    for number, (teacher, student), path in itertools.product(range(1, config.rounds + 1), config.pairs,
                                                              config.paths):
        job = Job(teacher, student, path, settings[path], data, config.sizes, str(device), config.threads,
                  config.seed)
        row = run(job)
        raw.setdefault((teacher, student, path), []).append(row)
        rate = statistics.median(n / s for n, s in zip(row["step_images"], row["step_seconds"]))
        log(f"  round {number}/{config.rounds} {teacher}->{student} {path}: {rate:.1f} img/s")
    results = [merge_rounds(rows, config.sizes) for rows in raw.values()]
    report = {
        "machine": machine_info(device),
        "setup": {"recipe": RECIPE_TEXT, "data": asdict(data), "teacher_weights": f"random init (seed {config.seed})",
                  "timing": "median over timed steps of images/s per step (fetch batch, forwards, losses, backward, "
                            "SGD step; CUDA synchronised), after warm-up steps, pooled over rounds that interleave "
                            "the paths; one fresh process per (pair, path, round)"
                            if config.isolate else "same, all paths in one process (--no-isolate: test mode)",
                  "rss": "rss_peak_mb: peak resident set of the training process (VmHWM); DataLoader workers are "
                         "separate processes and not included",
                  "teacher_cache_size": cache_size_note(config.cache_dtype),
                  "wall_s": round(time.time() - started, 1)},
        "paths": {name: {"settings": asdict(settings[name]), "description": describe(settings[name])}
                  for name in config.paths},
        "results": results,
        "ratios": ratios(results),
    }
    atomic_write_json(config.output, report)
    log(format_table(results))
    log(f"wrote {config.output}")
    return report


# -- command line -----------------------------------------------------------------------------------------------
def _parse_pair(text: str) -> tuple[str, str]:
    parts = text.replace("->", ":").split(":")
    if len(parts) != 2 or not all(parts):
        raise ReproError(f"--pairs: {text!r} is not TEACHER:STUDENT (e.g. resnet56:resnet20)")
    return parts[0], parts[1]


def _check_models(pairs: tuple[tuple[str, str], ...]) -> None:
    from repro.models import model_names

    known = set(model_names())
    unknown = sorted({name for pair in pairs for name in pair} - known)
    if unknown:
        raise ReproError(f"--pairs: unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=None, metavar="TEACHER:STUDENT",
                   help=f"default: {' '.join(DEFAULT_PAIRS)} (--quick: {' '.join(QUICK_PAIRS)})")
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=list(DEFAULT_PATHS))
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per path (default {FULL_SIZES.steps}; --quick {QUICK_SIZES.steps})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps first (default {FULL_SIZES.warmup}; --quick {QUICK_SIZES.warmup})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {FULL_SIZES.batch_size} as the papers (--quick {QUICK_SIZES.batch_size})")
    p.add_argument("--workers", type=int, default=2,
                   help="reference DataLoader workers (the official loop uses 8 on a GPU box; default 2 = the "
                        "cores of the 2-core CPU machine this was written on)")
    p.add_argument("--channels-last", action="store_true", help="fast paths in channels_last (default: NCHW, "
                                                                "the recipe default)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--data-root", default=None, help="where CIFAR-100 is looked for (default: $REPRO_DATA or data/)")
    p.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--quick", action="store_true", help="tiny models, data and step counts (the test's setting)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every path in this process (faster to start; flush-denormal then leaks between "
                        "paths, so only for tests)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every path this many times, interleaved, pooling the timed steps (steadier numbers "
                        "on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    defaults = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = RunSizes(steps=args.steps if args.steps is not None else defaults.steps,
                     warmup=args.warmup if args.warmup is not None else defaults.warmup,
                     batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size)
    if sizes.steps < 1 or sizes.warmup < 0 or sizes.batch_size < 1 or args.rounds < 1:
        raise ReproError(f"bench needs --steps >= 1, --warmup >= 0, --batch-size >= 1 and --rounds >= 1, got "
                         f"{sizes}, rounds={args.rounds}")
    if args.workers < 0 or (args.threads is not None and args.threads < 1):
        raise ReproError("--workers must be >= 0 and --threads >= 1")
    pairs = tuple(_parse_pair(p) for p in (args.pairs or (QUICK_PAIRS if args.quick else DEFAULT_PAIRS)))
    _check_models(pairs)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ReproError(f"--device {args.device}: CUDA is not available on this machine")
    else:
        device = args.device
    data_root = Path(args.data_root or os.environ.get("REPRO_DATA", "data"))
    return BenchConfig(pairs=pairs, paths=tuple(dict.fromkeys(args.paths)), sizes=sizes, workers=args.workers,
                       channels_last=args.channels_last, cache_dtype=args.cache_dtype, threads=args.threads,
                       device=device, data_root=data_root, output=Path(args.output), quick=args.quick,
                       isolate=args.isolate, rounds=args.rounds, seed=args.seed)


def run_bench(args: argparse.Namespace) -> int:
    """``python -m bench``: run the benchmark, write the JSON, print the table; exit code 0."""
    benchmark(config_from_args(args))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    try:
        return run_bench(args)
    except ReproError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
