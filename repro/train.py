"""One training loop for every run: CE teachers, the tables' Student rows, and every distillation method.

It knows models, loss terms and data pipelines, never specs or YAML: its input is a run's resolved config.
Resume is exact: each epoch's data order and augmentation are a pure function of (seed, epoch), and the
checkpoint written at the end of every epoch holds model, optimizer, loss-term state and every RNG state.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from repro.errors import ReproError
from repro.methods import Distiller, TermContext, get_term
from repro.methods.base import Batch, TeacherFn, forward_model
from repro.models import create_model
from repro.optim import OPTIMIZERS, SCHEDULES, effective_lr
from repro.pipelines import DataBundle, build_pipeline
from repro.provenance import environment
from repro.spec import Recipe
from repro.store import RunStore, atomic_torch_save


class RunFailed(Exception):
    """A run that cannot finish (non-finite loss, failed teacher gate): recorded as failed, never as a number."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass
class Resolved:
    """Frozen models a run depends on, already loaded on the device."""

    init_state: Optional[dict[str, torch.Tensor]] = None  # weights the student starts from (fine-tuning)
    teacher: Optional[nn.Module] = None
    teacher_key: Optional[str] = None  # hash of the teacher's weights (keys the teacher-output cache)
    assistants: Optional[dict[str, nn.Module]] = None


# -- numerics and determinism --------------------------------------------------------------------------------
def configure_numerics(recipe: Recipe, device: torch.device, seed: int) -> list[str]:
    """Seed everything and set the recipe's numeric switches; returns the deviations to record."""
    notes = []
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if recipe.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if recipe.flush_denormal and device.type == "cpu":
        # Randomly initialised deep ResNets produce denormals that slow CPU convolutions several-fold.
        if torch.set_flush_denormal(True):
            notes.append("denormal floats flushed to zero (CPU speed; numerically negligible)")
    if recipe.precision == "bf16":
        notes.append("bf16 autocast for forward passes (losses in float32)")
    if recipe.channels_last:
        notes.append("channels_last memory format")
    if recipe.compile:
        notes.append("torch.compile")
    if recipe.teacher_cache:
        notes.append("teacher logits from the exact teacher-output cache")
    return notes


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, autocast: Callable[[], Any] = nullcontext) -> dict[str, float]:
    """Top-1 / top-5 (%) over the whole test loader, model in eval mode."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for batch in loader:
        with autocast():
            logits = model(batch.images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(batch.labels.view(-1, 1))
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += int(batch.labels.numel())
    model.train(was_training)
    if total == 0:
        raise ReproError("the test set is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def mean_entropy(logits: torch.Tensor) -> float:
    """The student's mean predictive entropy H(q) over a batch (nats); WTTM Figure 1 plots it per epoch."""
    log_q = F.log_softmax(logits.detach().float(), dim=1)
    return float(-(log_q.exp() * log_q).sum(dim=1).mean())


# -- one run -------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: dict[str, Any], store: RunStore, run_id: str, device: torch.device,
                 resolved: Resolved, progress: bool = True) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.device = device
        self.resolved = resolved
        self.progress = progress
        self.recipe = Recipe.model_validate(_recipe_with_defaults(config["recipe"]))
        self.seed = int(config["seed"])

    def _autocast(self) -> Any:
        if self.recipe.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _build(self) -> None:
        recipe = self.recipe
        self.deviations = configure_numerics(recipe, self.device, self.seed)
        self.data: DataBundle = build_pipeline(recipe, self.seed, self.device)
        model_cfg = self.config["model"]
        torch.manual_seed(self.seed)  # weights depend on the seed alone, not on what the pipeline drew
        student = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        if self.resolved.init_state is not None:
            self.deviations.append(f"initialised from run {self.config['init']['run']} "
                                   f"({load_matching(student, self.resolved.init_state)} tensors)")
        student = student.to(self.device)
        if recipe.channels_last:
            student = student.to(memory_format=torch.channels_last)
        self.student = student
        ctx = TermContext(student=student, teacher=self.resolved.teacher, num_classes=model_cfg["num_classes"],
                          train_labels=self.data.train_labels.to(self.device), device=self.device,
                          epochs=recipe.epochs, image_size=self.data.image_size,
                          assistants=self.resolved.assistants or {}, sample_batches=self._sample_batches,
                          cache_dir=self.store.root / ".cache" / "analyses")
        self._probe_feature_dims(ctx)
        terms = {}
        for name, params in self.config["losses"].items():
            params = dict(params)
            weight = params.pop("weight", 1.0)
            terms[name] = (weight, get_term(name)(ctx, **params).to(self.device))
        wants_features = any(term.features for _, term in terms.values())  # the cache holds logits only
        self.distiller = Distiller(student, self.resolved.teacher, terms,
                                   teacher_fn=None if wants_features else self._teacher_fn())
        self.lr = effective_lr(recipe.optimizer, recipe.batch_size)
        self.optimizer = OPTIMIZERS.get(recipe.optimizer.name)([student, self.distiller.terms], recipe.optimizer,
                                                               self.lr)
        self.scheduler = SCHEDULES.get(recipe.schedule.name)(self.optimizer, recipe.schedule, recipe.epochs)
        self.forward_student = torch.compile(student) if recipe.compile else student

    def _sample_batches(self, n: int) -> Any:
        """The first n batches of epoch 1's order (the loader's order is a function of (seed, epoch) alone, so
        reading them here changes nothing in training)."""
        self.data.train.set_epoch(1)
        for i, batch in enumerate(self.data.train):
            if i >= n:
                break
            yield batch

    def _probe_feature_dims(self, ctx: TermContext) -> None:
        """Feature widths for terms with heads (CRD, ITRD), from one no-grad forward on a tiny batch."""
        wants = any(getattr(get_term(n), "features", None) for n in self.config["losses"])
        if not wants:
            return
        probe = torch.zeros(2, 3, self.data.image_size, self.data.image_size, device=self.device)
        for model, attr in ((ctx.student, "student_feat_dims"), (ctx.teacher, "teacher_feat_dims")):
            if model is None:
                continue
            was_training = model.training
            model.eval()
            with torch.no_grad():
                _, feats = forward_model(model, probe, True, False)
            model.train(was_training)
            setattr(ctx, attr, [int(f.shape[1]) for f in feats or []])

    def _teacher_fn(self) -> Optional[TeacherFn]:
        if not (self.recipe.teacher_cache and self.resolved.teacher is not None and self.data.views):
            return None
        from repro.data.teacher_cache import TeacherCache, cached_teacher_fn

        norm = self.recipe.normalization
        # The key covers everything that changes the teacher's outputs: its weights and the numerics it runs with.
        teacher_key = f"{self.resolved.teacher_key}|{self.recipe.precision}|cl={self.recipe.channels_last}"
        cache = TeacherCache.open(self.store.root / ".cache" / "teacher_outputs", teacher_key=teacher_key,
                                  data_fingerprint=self.data.dataset.fingerprint,
                                  normalization=(tuple(norm.mean), tuple(norm.std)),
                                  num_images=self.data.train_size, num_classes=self.config["model"]["num_classes"],
                                  dtype=self.recipe.pipeline_args.get("teacher_cache_dtype", "float16"))
        return cached_teacher_fn(cache, self.resolved.teacher, self.device)

    # -- state -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int, best: dict[str, Any], history: list[dict[str, Any]]) -> None:
        atomic_torch_save(self.store.checkpoint_path(self.run_id), {
            "epoch": epoch,
            "model": self.student.state_dict(),
            "terms": self.distiller.terms.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": best,
            "history": history,
            "rng": rng_state(),
        })
        self.store.write_metrics(self.run_id, history)

    def _load_checkpoint(self) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        path = self.store.checkpoint_path(self.run_id)
        if not path.is_file():
            return 0, {"top1": -1.0, "epoch": 0}, []
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.student.load_state_dict(state["model"])
        self.distiller.terms.load_state_dict(state["terms"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.store.write_metrics(self.run_id, state["history"])  # drop lines written after that checkpoint
        return int(state["epoch"]), state["best"], state["history"]

    # -- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._build()
        start_epoch, best, history = self._load_checkpoint()
        epochs = self.recipe.epochs
        steps_per_epoch = len(self.data.train)
        bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=self.run_id[:8],
                   leave=False, disable=not self.progress, mininterval=1.0, unit="step")
        images_seen, train_seconds = 0, 0.0
        for epoch in range(start_epoch + 1, epochs + 1):
            self.scheduler.step(epoch - 1)  # 0-based t at the start of 1-based epoch `epoch`
            t0 = time.perf_counter()
            sums, n_images = self._train_epoch(epoch, bar)
            train_seconds += time.perf_counter() - t0
            images_seen += n_images
            scores = evaluate(self.forward_student, self.data.test, self._autocast)
            means = {k: v / max(n_images, 1) for k, v in sums.items()}
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                   **{f"loss_{k}": v for k, v in means.items() if k != "entropy"},
                   "entropy": means.get("entropy"), "test_top1": scores["top1"], "test_top5": scores["top5"],
                   "wall_time_s": time.perf_counter() - t0}
            history.append(row)
            if scores["top1"] > best["top1"]:
                best = {"top1": scores["top1"], "top5": scores["top5"], "epoch": epoch}
            self._save_checkpoint(epoch, best, history)
        bar.close()
        atomic_torch_save(self.store.model_path(self.run_id), self.student.state_dict())
        last = history[-1]
        return {
            "best_top1": best["top1"], "best_top5": best.get("top5"), "best_epoch": best["epoch"],
            "last_top1": last["test_top1"], "last_top5": last["test_top5"], "epochs": epochs,
            "final_entropy": last.get("entropy"),
            "images_per_s": images_seen / train_seconds if train_seconds > 0 else None,
            "lr": self.lr, "world_size": 1, "global_batch": self.recipe.batch_size,
            "per_device_batch": self.recipe.batch_size, "grad_accum_steps": 1,
            "data_fingerprint": self.data.fingerprint, "deviations": self.deviations,
        }

    def _train_epoch(self, epoch: int, bar: Any) -> tuple[dict[str, float], int]:
        self.distiller.train()
        self.data.train.set_epoch(epoch)
        sums: dict[str, float] = {}
        n_images = 0
        for step, batch in enumerate(self.data.train):
            batch.epoch = epoch
            with self._autocast():
                logits, losses = self.distiller.forward_train(batch)
            total = sum(losses.values())
            if not torch.isfinite(total):
                values = {k: float(v.detach()) for k, v in losses.items()}
                raise RunFailed(f"non-finite loss at epoch {epoch}, step {step + 1}: {values}",
                                epoch=epoch, step=step + 1, losses=values)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.recipe.clip_grad_norm:
                nn.utils.clip_grad_norm_(self.student.parameters(), self.recipe.clip_grad_norm)
            self.optimizer.step()
            b = int(batch.labels.numel())
            n_images += b
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * b
            sums["total"] = sums.get("total", 0.0) + float(total.detach()) * b
            sums["entropy"] = sums.get("entropy", 0.0) + mean_entropy(logits) * b
            bar.update(1)
        return sums, n_images


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Load every tensor whose name and shape match (a new classifier for another class count stays fresh)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ReproError("the initial weights share no tensor with the model: wrong architecture?")
    model.load_state_dict(matching, strict=False)
    return len(matching)


def _recipe_with_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    # Run configs drop the planner-only keys; put neutral defaults back so the Recipe model validates.
    return {**recipe, "lr_by_arch": {}}


def train_run(config: dict[str, Any], store: RunStore, run_id: str, device: torch.device, resolved: Resolved,
              progress: bool = True) -> dict[str, Any]:
    """Train (or resume) one run and return its result fields (without the environment stamp)."""
    return Trainer(config, store, run_id, device, resolved, progress).run()


def evaluate_model(model: nn.Module, recipe_dict: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of a model on the recipe's test split (the teacher-accuracy gate uses it)."""
    recipe = Recipe.model_validate(_recipe_with_defaults(recipe_dict))
    data = build_pipeline(recipe, 0, device)
    return evaluate(model.to(device), data.test)


def stamp(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {**result, **environment(device)}


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
