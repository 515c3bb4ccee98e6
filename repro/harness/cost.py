"""Cost model: estimate each run's time on a device from measured throughput.

Throughput comes from finished runs in the store with the same student/teacher/pipeline on the same device
(images/s they recorded), else from a short micro-benchmark, cached per device in ``<runs>/.cache/throughput.json``.

The micro-benchmark times the recipe's batch size (small CIFAR models are launch-bound on a GPU: batch 16 would
underestimate their throughput several-fold), after a warm-up step, for at least ``MIN_STEPS`` steps and
``MIN_SECONDS``. On a CPU the batch is capped at ``CPU_MAX_BATCH`` (throughput per image is flat beyond a few
dozen images there, and a 1024-image ViT step would need tens of GB) and at ``CPU_MAX_PIXELS`` pixels; a batch
that does not fit in memory is halved until it does.

Runs that execute elsewhere (Slurm nodes seen from a login node) are estimated from the cache entries of their device, by name (``CostModel.from_cache``), never from this
machine's: a missing entry is a refusal that says how to measure it.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import torch

from repro.core.io import atomic_write_json
from repro.core.errors import ReproError
from repro.methods import get_term
from repro.models import create_model
from repro.harness.plan import WEIGHT_ARGS, Plan, PlannedRun
from repro.core.env import device_name
from repro.harness.store import RunStore

_WEIGHT_ARGS = WEIGHT_ARGS  # never load weights just to time a model
CPU_MAX_BATCH = 64
CPU_MAX_PIXELS = 8 * 224 * 224  # per CPU batch: 64 CIFAR images, 8 ImageNet ones (a few seconds per step at most)
MIN_STEPS = 3
MIN_SECONDS = 0.25  # per measurement, after the warm-up: a stable rate, still short for `repro plan`
MAX_STEPS = 50
KNOWN_SIZES = {"cifar100": (50000, 10000), "cifar10": (50000, 10000), "imagenet": (1281167, 50000)}


def dataset_sizes(recipe: dict[str, Any]) -> tuple[int, int]:
    data = recipe["data"]
    train, test = KNOWN_SIZES.get(data["name"], (10000, 1000))
    synthetic = data.get("synthetic") or {}
    if synthetic:
        classes = synthetic.get("classes_used") or synthetic.get("classes") or 10
        classes = classes if isinstance(classes, int) else len(classes)  # the folder writer also takes names
        # CIFAR writer: train_per_class / test_per_class; ImageFolder writer: per_class / val_per_class
        per_train = synthetic.get("train_per_class") or synthetic.get("per_class") or 50
        per_test = synthetic.get("test_per_class") or synthetic.get("val_per_class") or synthetic.get("per_class") or 10
        train, test = classes * per_train, classes * per_test
    train = min(train, data.get("train_subset") or train)
    test = min(test, data.get("test_subset") or test)
    return train, test


def measured_devices(store: RunStore) -> list[str]:
    """The device names with cached throughput measurements in this store."""
    path = store.root / ".cache" / "throughput.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    return sorted({key.split("|", 1)[0] for key in cache})


def _image_size(recipe: dict[str, Any]) -> int:
    return int(recipe.get("pipeline_args", {}).get("image_size", 32))


class CannotEstimate(ReproError):
    """No measured throughput for the target device; the message says what is missing and how to measure it."""


class CostModel:
    def __init__(self, store: RunStore, device: Optional[torch.device], device_key: Optional[str] = None) -> None:
        """``device``: measure what the cache lacks on it (this machine's). Without one, ``device_key`` names the
        target device, whose cached measurements are all there is."""
        if device is None and device_key is None:
            raise ValueError("CostModel needs a device to measure on or the name of a measured one")
        self.store = store
        self.device = device
        self.device_key = device_key or device_name(device)  # type: ignore[arg-type]
        self.path = store.root / ".cache" / "throughput.json"
        self.cache: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if device is not None and device.type == "cpu":
            torch.set_flush_denormal(True)  # as the runs themselves do (recipe.flush_denormal)

    @classmethod
    def from_cache(cls, store: RunStore, device_key: str) -> "CostModel":
        """Estimates for a device this machine does not have, from its cached measurements only."""
        return cls(store, None, device_key)


    def _teacher_model(self, plan: Plan, run: PlannedRun) -> Optional[dict[str, Any]]:
        teacher = run.config.get("teacher")
        if not teacher:
            return None
        return plan.runs[teacher["run"]].config["model"] if teacher["run"] in plan.runs else None

    def images_per_s(self, model: dict[str, Any], teacher: Optional[dict[str, Any]], recipe: dict[str, Any]) -> float:
        """Training images/s of ``model`` (a run config's model entry) with ``teacher`` forwarded on every step,
        at the recipe's batch size."""
        size = _image_size(recipe)
        batch = self.measured_batch(int(recipe.get("batch_size", 64)), size)
        seconds = 1.0 / self._rate(model, size, train=True, batch=batch)
        if teacher:
            seconds += 1.0 / self._rate(teacher, size, train=False, batch=batch)
        return 1.0 / seconds

    def measured_batch(self, recipe_batch: int, size: int) -> int:
        """The batch the micro-benchmark times: the recipe's, capped on a CPU (see the module docstring)."""
        # A target device known only by name (Slurm, seen from a login node) is a CPU if device_name said so.
        on_cpu = self.device.type == "cpu" if self.device is not None else self.device_key.startswith("cpu")
        if not on_cpu:
            return max(1, recipe_batch)
        return max(1, min(recipe_batch, CPU_MAX_BATCH, CPU_MAX_PIXELS // (size * size)))

    def _rate(self, model: dict[str, Any], size: int, train: bool, batch: int) -> float:
        # The architecture arguments (img_size, patch_size, ...) change the cost; weight sources do not.
        args = {k: v for k, v in model.get("args", {}).items() if k not in _WEIGHT_ARGS}
        key = (f"{self.device_key}|{model['arch']}|{json.dumps(args, sort_keys=True)}|{size}|"
               f"{'train' if train else 'forward'}|b{batch}")
        if key not in self.cache:
            if self.device is None:
                raise CannotEstimate(
                    f"no throughput of {model['arch']} ({'training' if train else 'forward'}, {size} px) measured on "
                    f"{self.device_key!r}; measure it on such a device once (e.g. `srun ... repro plan SPEC "
                    f"--device cuda --runs {self.store.root}`), or pass --no-estimate")
            self.cache[key] = self._measure(model["arch"], args, size, train, batch)
            atomic_write_json(self.path, self.cache)
        return self.cache[key]

    def _measure(self, arch: str, args: dict[str, Any], size: int, train: bool, batch: int) -> float:
        """Images/s at ``batch`` (halved while it does not fit in memory)."""
        assert self.device is not None
        torch.manual_seed(0)
        model = create_model(arch, **args).to(self.device).train(train)
        while True:
            try:
                return self._time_steps(model, size, train, batch)
            except (torch.OutOfMemoryError, MemoryError):
                if batch == 1:
                    raise
                batch //= 2
                model.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _time_steps(self, model: torch.nn.Module, size: int, train: bool, batch: int) -> float:
        x = torch.randn(batch, 3, size, size, device=self.device)

        def step() -> None:
            if not train:
                with torch.no_grad():
                    model(x)
                return
            model.zero_grad(set_to_none=True)
            model(x).float().logsumexp(1).mean().backward()

        step()  # warm-up (allocations, kernel selection)
        self._synchronize()
        steps, t0 = 0, time.perf_counter()
        while steps < MIN_STEPS or (time.perf_counter() - t0 < MIN_SECONDS and steps < MAX_STEPS):
            step()
            steps += 1
            if steps >= MIN_STEPS:
                self._synchronize()  # the clock must see the queued work before deciding to stop
        return steps * batch / (time.perf_counter() - t0)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def estimate_seconds(self, plan: Plan, run: PlannedRun) -> float:
        recipe = run.config["recipe"]
        train, test = dataset_sizes(recipe)
        model = run.config["model"]
        if run.config["kind"] == "eval":
            return 3 * test / self.images_per_s(model, None, recipe)
        rate = self.images_per_s(model, self._teacher_model(plan, run), recipe)
        # Evaluation costs about a third of a training step per image, after every epoch or only the last
        # (eval_every_epoch); an initialisation stage (AB, FT, FSP) adds its epochs of training without evaluation.
        init_epochs = max((get_term(name).planned_init_epochs(params)
                           for name, params in run.config.get("losses", {}).items()), default=0)
        evaluations = recipe["epochs"] if recipe.get("eval_every_epoch", True) else 1
        return (recipe["epochs"] * train + evaluations * test / 3 + init_epochs * train) / rate


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
