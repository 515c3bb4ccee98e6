"""One training loop for every run: CE teachers, the tables' Student rows, and every distillation method.

It knows models, loss terms and data pipelines, never specs or YAML: its input is a run's resolved config.
Resume is exact: each epoch's data order and augmentation are a pure function of (seed, epoch), and the
checkpoint written at the end of every epoch holds model, optimizer, loss-term state and every RNG state.

On several processes (``repro.train.distributed``) each rank trains on its slice of every global batch under DDP, with
SyncBatchNorm by default; evaluation is split across ranks and summed, so every test image counts once. Only
rank 0 writes checkpoints and results; checkpoints hold plain (unwrapped) state dicts, so a run resumes at any
world size.
"""
# Longer than ~400 lines on purpose: the Trainer's state (model, terms, optimizer, RNGs, init stage) is what exact resume checkpoints; its loop, evaluation and resume are read and tested as one unit.
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from repro.train import distributed
from repro.core import numerics
from repro.data.batch import Batch, DataBundle
from repro.train.distributed import ScaleOptions, all_reduce_sum
from repro.core.io import atomic_torch_save
from repro.core.errors import ReproError
from repro.train.loggers import EpochLog
from repro.methods import Distiller, TermContext, get_term
from repro.methods.base import InitStage, LossTerm, Outputs, TeacherFn, forward_model
from repro.models import create_model
from repro.train.optim import OPTIMIZERS, SCHEDULES, effective_lr
from repro.data.pipelines import build_pipeline
from repro.core.env import environment
from repro.train.config import TrainRecipe
from repro.train.precise_bn import batchnorm_layers, recalibrate_batchnorm
from repro.train.teacher_cache_open import LastFeature, cache_last_feature, open_teacher_cache


class RunFiles(Protocol):
    """Where one run's files live: what the trainer needs of the run store (``repro.harness.store.RunStore``), which the
    harness owns; the trainer only writes the files of the run it was given."""

    root: Path  # the store's root (its ``.cache`` holds the teacher-output and analysis caches)

    def run_dir(self, run_id: str) -> Path: ...
    def checkpoint_path(self, run_id: str) -> Path: ...
    def model_path(self, run_id: str) -> Path: ...
    def write_metrics(self, run_id: str, history: list[dict[str, Any]]) -> None: ...


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


@dataclass
class InitRun:
    """A term's initialisation stage as this run trains it: the term, its stage, the stage's optimizer and lr."""

    name: str
    term: LossTerm
    stage: InitStage
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer
    lr: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished stage epoch


def student_feature_modules(student: nn.Module) -> list[nn.Module]:
    """The student without its classifier, as modules (RepDistiller's ``get_feat_modules``): every direct child
    but ``get_classifier()``, and the student's own direct parameters if it has any."""
    classifier = student.get_classifier() if hasattr(student, "get_classifier") else None
    children = list(student.children())
    if classifier is None or not any(child is classifier for child in children):
        raise ReproError(f"an initialisation stage that trains the student needs its classifier as a direct "
                         f"submodule named by get_classifier(); {type(student).__name__} has none")
    modules = [child for child in children if child is not classifier]
    own = list(student.parameters(recurse=False))
    return modules + ([nn.ParameterList(own)] if own else [])


# -- numerics and determinism --------------------------------------------------------------------------------
def configure_numerics(recipe: TrainRecipe, device: torch.device, seed: int) -> list[str]:
    """Seed everything and set every numeric switch from the recipe (none inherited from an earlier run in this
    process); returns the deviations to record."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    notes = set_backend_flags(recipe, device)
    if recipe.precision == "bf16":
        notes.append("bf16 autocast for forward passes (losses in float32)")
    if recipe.channels_last:
        notes.append("channels_last memory format")
    # compile and teacher_cache are stamped where the run decides what actually happens (Trainer._build).
    return notes


def set_backend_flags(recipe: TrainRecipe, device: torch.device) -> list[str]:
    """Determinism, TF32 and denormal flushing as the recipe asks, every one set explicitly."""
    notes = numerics.apply_determinism(recipe.deterministic, device)
    notes += numerics.apply_tf32(recipe.tf32, device)
    # Randomly initialised deep ResNets produce denormals that slow CPU convolutions several-fold.
    flush = recipe.flush_denormal and device.type == "cpu"
    if torch.set_flush_denormal(flush) and flush:
        notes.append("denormal floats flushed to zero (CPU speed; numerically negligible)")
    return notes


def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch's CPU generator and its own CUDA device's generator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # checkpoints before per-rank states: every device's, by index
        index = (device.index or 0) if device is not None else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


def gather_rng_states(par: distributed.Parallel, device: torch.device) -> Optional[dict[str, Any]]:
    """Every rank's RNG states, by rank, on rank 0 (None elsewhere); every rank must call it."""
    mine = rng_state(device)
    if not par.distributed:
        return {"world_size": 1, "ranks": [mine]}
    ranks = distributed.gather_object(mine, par)
    return {"world_size": par.world_size, "ranks": ranks} if par.is_main else None


def restore_rng_states(saved: dict[str, Any], par: distributed.Parallel, device: torch.device) -> list[str]:
    """This rank's saved RNG states; returns the deviations (the same on every rank).

    A rank the checkpoint has no state for (resumed at a larger world size) takes rank 0's: every rank starts a
    run from the same seed and, on equal slices, draws alike, so that is what it would hold. A CUDA run resumed
    from a checkpoint without CUDA states (written on CPU) keeps its CUDA generator as the run's seed left it.
    """
    ranks = saved["ranks"] if "ranks" in saved else [saved]  # earlier checkpoints: one state for all ranks
    mine = ranks[par.rank] if par.rank < len(ranks) else ranks[0]
    set_rng_state(mine, device)
    notes = []
    if par.world_size > len(ranks):
        first, last = len(ranks), par.world_size - 1
        which = f"rank {first}" if first == last else f"ranks {first}-{last}"
        notes.append(f"resumed on {par.world_size} processes from a checkpoint of {len(ranks)}: {which} had no "
                     f"saved RNG state and took rank 0's")
    if device.type == "cuda" and "cuda" not in mine:
        notes.append("resumed on CUDA from a checkpoint without CUDA RNG states: the CUDA generator continues "
                     "from the run's seed")
    return notes


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, autocast: Callable[[], Any] = nullcontext,
             sharded: bool = False) -> dict[str, float]:
    """Top-1 / top-5 (%) over the whole test loader, model in eval mode.

    ``sharded``: the loader yields this rank's share of the test set; the counts are summed over ranks, so each
    test image counts exactly once whatever the world size (no padding, no duplicates). ``images`` is that count.
    """
    was_training = model.training
    model.eval()
    # Hits are summed on the device and read once at the end (a per-batch int() would stall the GPU's queue).
    hits_sum: Optional[torch.Tensor] = None  # correct top-1, correct top-5
    images = 0
    for batch in loader:
        if batch.labels.numel() == 0:
            continue  # a rank's share of a batch smaller than the world
        with autocast():
            logits = model(batch.images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(batch.labels.view(-1, 1))
        batch_hits = torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).to(torch.float64)
        hits_sum = batch_hits if hits_sum is None else hits_sum + batch_hits
        images += int(batch.labels.numel())  # a shape: no device read
    model.train(was_training)
    if hits_sum is None:
        hits_sum = torch.zeros(2, dtype=torch.float64)
    counts = torch.cat([hits_sum.to(torch.float64),
                        torch.tensor([float(images)], dtype=torch.float64, device=hits_sum.device)])
    if sharded:
        counts = all_reduce_sum(counts.to(_collective_device(loader)))
    correct1, correct5, total = (int(c) for c in counts.tolist())
    if total == 0:
        raise ReproError("the test set is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "images": total}


def shard_for_evaluation(loader: Any) -> tuple[Any, bool]:
    """``(loader, sharded)``: this rank's share of the test set when the loader can split it; otherwise every rank
    evaluates the whole set (slower, equally exact)."""
    par = distributed.current()
    if par.distributed and hasattr(loader, "shard"):
        return loader.shard(par.rank, par.world_size), True
    return loader, False


def _collective_device(loader: Any) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    device = torch.device(getattr(loader, "device", "cpu"))
    return device if device.type == "cuda" else torch.device("cpu")


def batch_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The student's mean predictive entropy H(q) over a batch (nats), a 0-d float32 tensor on the logits' device
    (the training loop sums it there and reads it once per epoch); WTTM Figure 1 plots it per epoch."""
    log_q = F.log_softmax(logits.detach().float(), dim=1)
    return -(log_q.exp() * log_q).sum(dim=1).mean()


NOT_LOSSES = ("entropy", "train_top1", "train_top5")  # epoch means the accumulator keeps beside the loss terms


def train_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1/top-5 (percent) of a training batch against its hard labels, as device tensors (no host read);
    under mixup/cutmix this is against each image's own label."""
    with torch.no_grad():
        k = min(5, logits.shape[-1])
        top = logits.detach().topk(k, dim=-1).indices
        hits = top == labels.view(-1, 1)
        return {"train_top1": hits[:, 0].float().mean() * 100.0, "train_top5": hits.any(dim=-1).float().mean() * 100.0}


def mean_entropy(logits: torch.Tensor) -> float:
    """``batch_entropy`` as a Python float (a host read: not for the training loop)."""
    return float(batch_entropy(logits))


# -- one run -------------------------------------------------------------------------------------------------
class Trainer:
    init: Optional[InitRun] = None  # set by _build_init_stage when a term declares an initialisation stage

    def __init__(self, config: dict[str, Any], store: RunFiles, run_id: str, device: torch.device,
                 resolved: Resolved, progress: bool = True, options: Optional[ScaleOptions] = None) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.device = device
        self.resolved = resolved
        self.options = options or ScaleOptions()
        self.par = distributed.current()
        self.progress = progress and self.par.is_main
        self.recipe = TrainRecipe.model_validate(config["recipe"])
        self.seed = int(config["seed"])
        self.kernels: list[str] = []  # non-deterministic kernels that ran (train_run records them)
        self.mapping = distributed.map_batch(self.recipe.batch_size, self.par.world_size, self.options)

    def _autocast(self) -> Any:
        if self.recipe.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _build(self) -> None:
        recipe = self.recipe
        self.deviations = configure_numerics(recipe, self.device, self.seed)
        if self.mapping.rescaled:  # the pipeline batches the global batch actually trained with
            recipe = recipe.model_copy(update={"batch_size": self.mapping.global_batch})
        self.data: DataBundle = build_pipeline(recipe, self.seed, self.device)
        self.train_loader, _ = distributed.shard_loader(self.data.train, self.par, recipe.pipeline)
        self.test_loader, self.test_sharded = shard_for_evaluation(self.data.test)
        if self.par.distributed:
            distributed.check_tail(self.train_loader, self.mapping)
        model_cfg = self.config["model"]
        torch.manual_seed(self.seed)  # weights depend on the seed alone, not on what the pipeline drew
        student = create_model(model_cfg["arch"], num_classes=model_cfg["num_classes"], **model_cfg.get("args", {}))
        if self.resolved.init_state is not None:
            loaded, fresh = load_matching(student, self.resolved.init_state)
            self.deviations.append(f"initialised from run {self.config['init']['run']} ({loaded} tensors"
                                   + (f"; left at initialisation: {', '.join(fresh)})" if fresh else ")"))
        student = distributed.prepare_model(student, self.par, self.options, self.device).to(self.device)
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
        teacher_fn, cache_note = self._teacher_fn(terms, ctx)
        if cache_note:
            self.deviations.append(cache_note)
        self.distiller = Distiller(student, self.resolved.teacher, terms, teacher_fn=teacher_fn)
        self.lr = self._learning_rate()
        # Term modules trained only in an initialisation stage (FT's paraphraser) stay out of this optimizer.
        term_modules = nn.ModuleList([m for term in self.distiller.terms.values() for m in term.trainable_modules()])
        self.optimizer = OPTIMIZERS.get(recipe.optimizer.name)([student, term_modules], recipe.optimizer, self.lr)
        self._build_init_stage()
        self.steps_per_epoch = len(self.train_loader)  # optimizer steps (one per global batch)
        self.scheduler = SCHEDULES.get(recipe.schedule.name)(self.optimizer, recipe.schedule, recipe.epochs,
                                                             self.steps_per_epoch)
        if recipe.compile:
            # In place (nn.Module.compile): the Distiller's training forward and evaluation both call the
            # compiled module, and the state dict keeps its plain names (checkpoints load uncompiled).
            student.compile()
            self.deviations.append("torch.compile (inductor) of the student's forward, training and evaluation; "
                                   "teacher, loss terms, backward bookkeeping and optimizer step eager")
        self.deviations += self._scale_deviations()
        if recipe.precise_bn_batches:
            self.deviations.append(f"BatchNorm statistics re-estimated from {recipe.precise_bn_batches} training "
                                   f"batches before each evaluation (precise BN)")
        if not recipe.eval_every_epoch and recipe.epochs > 1:
            self.deviations.append("evaluated after the last epoch only (its best epoch is the last)")

    def _learning_rate(self) -> float:
        """The recipe's lr at the recipe's global batch; a rescaled global batch scales it linearly (unless the
        recipe's own scaling rule already depends on the global batch)."""
        optimizer, m = self.recipe.optimizer, self.mapping
        if not m.rescaled or optimizer.lr_scale_base_batch:
            return effective_lr(optimizer, m.global_batch)
        return effective_lr(optimizer, m.recipe_batch) * m.global_batch / m.recipe_batch

    def _scale_deviations(self) -> list[str]:
        """What the multi-process mapping changes with respect to the single-device recipe."""
        m, notes = self.mapping, []
        if m.rescaled:
            notes.append(f"global batch {m.recipe_batch} rescaled to {m.global_batch} for {m.world_size} processes "
                         f"(lr {self.lr:g})")
        has_bn = distributed.has_batchnorm(self.student)
        if has_bn and m.world_size > 1 and self.options.bn == "per-device":
            notes.append(f"BatchNorm statistics per device ({m.per_device_batch} images), not over the global batch")
        if has_bn and m.grad_accum_steps > 1:
            notes.append(f"BatchNorm statistics over micro-batches of {m.per_device_batch * m.world_size} images "
                         f"({m.grad_accum_steps} accumulation steps)")
        if m.world_size > 1:
            for name in distributed.stateful_terms(self.distiller.terms):
                notes.append(f"loss term {name}: its state (e.g. a memory bank) is updated by each of the "
                             f"{m.world_size} processes from its own slice of the batch; rank 0's is kept")
        return notes

    def _sample_batches(self, n: int) -> Any:
        """The first n batches of epoch 1's order (the loader's order is a function of (seed, epoch) alone, so
        reading them here changes nothing in training)."""
        self.data.train.set_epoch(1)
        for i, batch in enumerate(self.data.train):
            if i >= n:
                break
            yield batch

    def _probe_feature_dims(self, ctx: TermContext) -> None:
        """Feature widths and per-sample shapes for terms with heads or connectors (CRD, FitNet, VID), from one
        no-grad forward on a tiny batch."""
        wants = any(getattr(get_term(n), "features", None) for n in self.config["losses"])
        if not wants:
            return
        probe = torch.zeros(2, 3, self.data.image_size, self.data.image_size, device=self.device)
        for model, side in ((ctx.student, "student"), (ctx.teacher, "teacher")):
            if model is None:
                continue
            was_training = model.training
            model.eval()
            with torch.no_grad():
                _, feats = forward_model(model, probe, True, False)
            model.train(was_training)
            setattr(ctx, f"{side}_feat_dims", [int(f.shape[1]) for f in feats or []])
            setattr(ctx, f"{side}_feat_shapes", [tuple(int(d) for d in f.shape[1:]) for f in feats or []])

    def _teacher_fn(self, terms: dict[str, tuple[float, Any]],
                    ctx: TermContext) -> tuple[Optional[TeacherFn], Optional[str]]:
        """The teacher-output cache's lookup when the run can use it, and the stamp saying what actually ran."""
        if not self.recipe.teacher_cache:
            return None, None
        reason = self._cache_unused_reason(terms)
        last = LastFeature(0, False)
        if reason is None:
            last = cache_last_feature(self.recipe, self.resolved.teacher, self.data.image_size, self.device)
            reason = self._feature_cache_unused_reason(terms, last)
        if reason:
            return None, f"teacher_cache requested but not used ({reason})"
        from repro.data.teacher_cache import cached_teacher_fn

        cache = open_teacher_cache(self.store.root, self.resolved.teacher_key, self.recipe, self.data.dataset,
                                   self.config["model"]["num_classes"], feature_width=last.width)
        served = "logits and last feature" if any(term.features for _, term in terms.values()) else "logits"
        note = f"teacher {served} from the exact teacher-output cache ({self.recipe.teacher_cache_dtype})"
        return cached_teacher_fn(cache, self.resolved.teacher, self.device, num_features=len(ctx.teacher_feat_dims),
                                 serves_preact=last.same_in_preact), note

    def _cache_unused_reason(self, terms: dict[str, tuple[float, Any]]) -> Optional[str]:
        if self.resolved.teacher is None:
            return "the run has no teacher"
        if not any(term.needs_teacher for _, term in terms.values()):
            return "no loss term reads the teacher's outputs"
        if not self.data.views:
            return f"pipeline {self.recipe.pipeline!r} has no discrete augmentation views; the teacher ran live"
        return None

    def _feature_cache_unused_reason(self, terms: dict[str, tuple[float, Any]], last: LastFeature) -> Optional[str]:
        """Why the cache cannot serve the run's feature terms (None when it can, or when there are none)."""
        feature_terms = {name: term for name, (_, term) in terms.items() if term.features}
        if not feature_terms:
            return None
        def named(keep: Callable[[Any], bool]) -> str:  # the terms the reason is about, not every feature term
            return ", ".join(sorted(name for name, term in feature_terms.items() if keep(term)))

        if not self.recipe.teacher_cache_features:  # the cache holds logits only
            return f"{named(lambda t: True)} read the teacher's features, so the teacher ran live"
        if beyond_last := named(lambda t: t.reads_teacher_features != "last"):
            return f"{beyond_last} read teacher features other than the last one, so the teacher ran live"
        if not last.width:
            return (f"{named(lambda t: True)} read the teacher's last feature, which is not a vector, so the "
                    f"teacher ran live")
        if (preact := named(lambda t: t.features == "preact")) and not last.same_in_preact:
            return (f"{preact} read the teacher's pre-activation last feature, which differs from the cached "
                    f"post-activation one, so the teacher ran live")
        return None

    # -- initialisation stage (RepDistiller helper/pretrain.py) --------------------------------------------------
    def _build_init_stage(self) -> None:
        """The initialisation stage of the (at most one) term that declares one, with its own optimizer."""
        self.init = None
        stages = {name: (term, stage) for name, term in self.distiller.terms.items()
                  if (stage := term.init_stage()) is not None and stage.epochs > 0}
        if not stages:
            return
        if len(stages) > 1:
            raise ReproError(f"at most one loss term may run an initialisation stage; {', '.join(sorted(stages))} do")
        if self.par.distributed:
            raise ReproError("an initialisation stage (loss term " + ", ".join(stages) + ") runs on a single "
                             "process only; run this cell without several processes")
        ((name, (term, stage)),) = stages.items()
        modules = list(stage.modules) + (student_feature_modules(self.student) if stage.trains_student else [])
        lr = float(stage.lr) if stage.lr is not None else self.lr
        # A fresh optimizer of the recipe's kind at a constant lr, as RepDistiller's init() builds its SGD.
        optimizer = OPTIMIZERS.get(self.recipe.optimizer.name)(modules, self.recipe.optimizer, lr)
        self.init = InitRun(name, term, stage, modules, optimizer, lr)

    def _run_init_stage(self, best: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """The stage's remaining epochs (none after a resume past it), each logged and checkpointed at epoch 0."""
        if self.init is None:
            return
        for k in range(len(self.init.history) + 1, self.init.stage.epochs + 1):
            t0 = time.perf_counter()
            loss = self._init_epoch(k)
            self.init.history.append({"stage": "init", "init_epoch": k, "term": self.init.name, "lr": self.init.lr,
                                      f"loss_init_{self.init.name}": loss, "wall_time_s": time.perf_counter() - t0})
            self._save_checkpoint(0, best, history)

    def _init_epoch(self, k: int) -> float:
        """One epoch of the initialisation stage; returns its mean loss."""
        run = self.init
        assert run is not None
        self.student.train(run.stage.trains_student)  # RepDistiller: model_s.eval(), then init_modules.train()
        for module in run.modules:
            module.train()
        self.train_loader.set_epoch(-k)  # the stage's own data orders (training epochs use 1..epochs)
        preact = run.term.features == "preact"
        student_grad = nullcontext if run.stage.trains_student else torch.no_grad
        acc, n_images = EpochAccumulator(self.device), 0
        for step, batch in enumerate(self.train_loader):
            batch.epoch = 0
            run.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                with student_grad():
                    logits, feats = forward_model(self.student, batch.images, True, preact)
                teacher_logits, teacher_feats = self.distiller.teacher_fn(batch, True, preact)
                loss = run.term.init_loss(Outputs(logits, feats, teacher_logits, teacher_feats), batch)
            loss.backward()
            if self.recipe.clip_grad_norm:  # the recipe's clip holds for every optimizer step of the run
                nn.utils.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]],
                                         self.recipe.clip_grad_norm)
            run.optimizer.step()
            images = int(batch.labels.numel())
            n_images += images
            acc.add(step + 1, images, {}, loss, batch_entropy(logits))
        sums, _ = acc.read()
        try:
            acc.raise_if_non_finite(k)
        except RunFailed as failure:
            raise RunFailed(f"initialisation stage of {run.name}: {failure.reason}", stage="init",
                            **failure.details) from None
        return sums.get("total", 0.0) / max(n_images, 1)

    def _init_rows(self) -> list[dict[str, Any]]:
        """The stage's metrics rows, written before the training epochs' (none without a stage)."""
        return self.init.history if self.init is not None else []

    def _init_state(self) -> Optional[dict[str, Any]]:
        if self.init is None:
            return None
        done = len(self.init.history) >= self.init.stage.epochs
        return {"history": self.init.history, "optimizer": None if done else self.init.optimizer.state_dict()}

    def _init_report(self) -> dict[str, Any]:
        """What the initialisation stage trained, stamped in the result (empty without one)."""
        if self.init is None:
            return {}
        term_parts = {id(m): f"{self.init.name}.{n}" for n, m in self.init.term.named_modules() if n}
        trained = [term_parts.get(id(m), self.init.name) for m in self.init.stage.modules]
        if self.init.stage.trains_student:
            trained.append("student (all but its classifier)")
        cfg = self.recipe.optimizer
        return {"init_stage": {
            "term": self.init.name, "epochs": len(self.init.history), "lr": self.init.lr, "trained": trained,
            "optimizer": {"name": cfg.name, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay},
            "loss_per_epoch": [row[f"loss_init_{self.init.name}"] for row in self.init.history]}}

    # -- state -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int, best: dict[str, Any], history: list[dict[str, Any]]) -> None:
        rng = gather_rng_states(self.par, self.device)  # each rank's own generators, by rank
        if not self.par.is_main:
            return  # every rank holds the same weights; one writer
        atomic_torch_save(self.store.checkpoint_path(self.run_id), {
            "epoch": epoch,
            "model": self.student.state_dict(),  # unwrapped: loads at any world size
            "terms": self.distiller.terms.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": best,
            "history": history,
            "rng": rng,
            "nondeterministic_kernels": list(self.kernels),  # rank 0's, since the run started
            "mapping": self.mapping.fields(),  # informative only: resuming at another world size is fine
            "init": self._init_state(),
        })
        self._write_metrics(history)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.par.is_main:
            self.store.write_metrics(self.run_id, self._init_rows() + history)

    def _load_checkpoint(self) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        path = self.store.checkpoint_path(self.run_id)
        if not path.is_file():
            return 0, {"top1": -1.0, "epoch": 0}, []
        # On the CPU: load_state_dict copies weights and buffers onto their modules' device and puts optimizer
        # state where the optimizer keeps it (Adam's `step` stays on the CPU unless capturable/fused); the RNG
        # states must stay CPU ByteTensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.student.load_state_dict(state["model"])
        self.distiller.terms.load_state_dict(state["terms"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.deviations += restore_rng_states(state["rng"], self.par, self.device)
        self.kernels += [k for k in state.get("nondeterministic_kernels", []) if k not in self.kernels]
        init = state.get("init")
        if init and self.init is not None:
            self.init.history = list(init["history"])
            if init["optimizer"] is not None:
                self.init.optimizer.load_state_dict(init["optimizer"])
        self._write_metrics(state["history"])  # drops the lines written after that checkpoint
        return int(state["epoch"]), state["best"], state["history"]

    # -- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._build()
        start_epoch, best, history = self._load_checkpoint()
        # Wrapped after loading: DDP starts by giving every rank rank 0's weights, the resumed ones.
        self.train_step = distributed.wrap_train_step(self.distiller, self.par, self.device, self.options)
        self._run_init_stage(best, history)
        epochs = self.recipe.epochs
        steps_per_epoch = len(self.train_loader)
        # Drawn only on a terminal (disable=None): in a log, a redrawn bar is a line per refresh.
        bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=self.run_id[:8],
                   leave=False, disable=None if self.progress else True, mininterval=1.0, unit="step")
        log = EpochLog(self.store.run_dir(self.run_id), self.run_id, self.config, start_epoch,
                       None if self.par.is_main else [])  # rank 0 logs
        try:
            history, best, images_seen, train_seconds = self._epochs(start_epoch, epochs, bar, log, history, best)
        finally:
            log.close()
        bar.close()
        if self.par.is_main:
            atomic_torch_save(self.store.model_path(self.run_id), self.student.state_dict())
        last = history[-1]
        return {
            "best_top1": best["top1"], "best_top5": best.get("top5"), "best_epoch": best["epoch"],
            "last_top1": last["test_top1"], "last_top5": last["test_top5"], "epochs": epochs,
            "final_entropy": last.get("entropy"),
            "images_per_s": images_seen / train_seconds if train_seconds > 0 else None,
            "lr": self.lr, **self.mapping.fields(),
            "sync_batchnorm": self.par.distributed and self.options.bn == "sync"
                              and distributed.has_batchnorm(self.student),
            "data_fingerprint": self.data.fingerprint, "deviations": self.deviations,
            "term_reports": self._term_reports(), **self._init_report(),
        }

    def _epochs(self, start_epoch: int, epochs: int, bar: Any, log: EpochLog, history: list[dict[str, Any]],
                best: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any], int, float]:
        images_seen, train_seconds = 0, 0.0
        for epoch in range(start_epoch + 1, epochs + 1):
            self.scheduler.step(epoch - 1)  # 0-based t at the start of 1-based epoch `epoch`
            t0 = time.perf_counter()
            sums, n_images = self._train_epoch(epoch, bar)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            images_seen += n_images
            scores = self._evaluate_epoch(epoch, last=epoch == epochs)
            means = {k: v / max(n_images, 1) for k, v in sums.items()}
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                   **{f"loss_{k}": v for k, v in means.items() if k not in NOT_LOSSES},
                   "entropy": means.get("entropy"), "train_top1": means.get("train_top1"),
                   "train_top5": means.get("train_top5"), "test_top1": scores["top1"], "test_top5": scores["top5"],
                   "test_images": scores["images"], "images_per_s": n_images / epoch_seconds if epoch_seconds else None,
                   "wall_time_s": time.perf_counter() - t0}
            history.append(row)
            if scores["top1"] is not None and scores["top1"] > best["top1"]:
                best = {"top1": scores["top1"], "top5": scores["top5"], "epoch": epoch}
            if epoch < epochs:
                self._save_checkpoint(epoch, best, history)
            else:
                # No full state after the last epoch: model.pt is written next, and a run killed in between
                # resumes from the epoch before (or the start) and replays this one exactly (the order and every
                # RNG state come from that checkpoint). At the smoke tier's few steps the write cost nearly as much
                # as an epoch's evaluation.
                self._write_metrics(history)
            log.log(row)
        return history, best, images_seen, train_seconds

    def _evaluate_epoch(self, epoch: int, last: bool) -> dict[str, Any]:
        """Test top-1/top-5 after ``epoch`` (precise BN first where the recipe asks); None for an epoch the recipe
        does not evaluate (``eval_every_epoch: false``: the last one only)."""
        if not (self.recipe.eval_every_epoch or last):
            return {"top1": None, "top5": None, "images": None}
        if self.recipe.precise_bn_batches:
            self._recalibrate_batchnorm(epoch)
        return evaluate(self.student, self.test_loader, self._autocast, sharded=self.test_sharded)

    def _recalibrate_batchnorm(self, epoch: int) -> None:
        """Precise BN over this epoch's first training batches (the same views on every resume); under DDP each
        rank uses its shard and the statistics are averaged over ranks, so every rank evaluates the same model."""
        self.train_loader.set_epoch(epoch)
        with self._autocast():
            recalibrate_batchnorm(self.student, (batch.images for batch in self.train_loader),
                                  self.recipe.precise_bn_batches)
        if self.par.distributed:
            for layer in batchnorm_layers(self.student):
                for stats in (layer.running_mean, layer.running_var):
                    all_reduce_sum(stats).div_(self.par.world_size)

    def _term_reports(self) -> dict[str, Any]:
        """What loss terms decided before training (SSTA's heads, their scores and rule), by term name."""
        return {name: report for name, term in self.distiller.terms.items() if (report := term.report())}

    def _train_epoch(self, epoch: int, bar: Any) -> tuple[dict[str, float], int]:
        """One epoch; returns the loss sums (weighted by images) and the images seen, over all ranks.

        Nothing is read back from the device inside the loop (small CIFAR models are launch-bound on a GPU, and
        every ``float()``/``bool()`` of a device tensor waits for the whole queue): the loss sums, the entropy and
        the first non-finite step are kept on the device (``EpochAccumulator``) and read once, at the end of the
        epoch. A non-finite loss therefore fails the run at the end of its epoch, with the epoch, step and loss
        values of the first non-finite step, before anything of that epoch is evaluated or checkpointed.
        """
        self.train_step.train()
        self.train_loader.set_epoch(epoch)
        acc = EpochAccumulator(self.device)
        n_images = 0
        try:
            for step, batch in enumerate(self.train_loader):
                batch.epoch = epoch
                self.scheduler.step_update((epoch - 1) * self.steps_per_epoch + step)  # per-step schedules only
                self.optimizer.zero_grad(set_to_none=True)
                global_count = self._global_count(batch, step)
                micro_batches = distributed.split_batch(batch, self.mapping.grad_accum_steps)
                for number, micro in enumerate(micro_batches):
                    # DDP all-reduces gradients on the last micro-batch's backward only.
                    syncing = number == len(micro_batches) - 1 or not self.par.distributed
                    with nullcontext() if syncing else self.train_step.no_sync():
                        b, losses, total, logits = self._micro_step(micro, global_count, epoch, step)
                    n_images += b
                    acc.add(step + 1, b, losses, total, batch_entropy(logits), train_accuracy(logits, micro.labels))
                if self.recipe.clip_grad_norm:
                    nn.utils.clip_grad_norm_(self.student.parameters(), self.recipe.clip_grad_norm)
                self.optimizer.step()
                bar.update(1)
        except Exception as error:
            # After a non-finite step the weights are NaN and some later operation may raise: the loss is the cause.
            acc.raise_if_non_finite(epoch, from_error=error)
            raise
        sums, n_images, failed_elsewhere = self._reduce_sums(*acc.read(), n_images)
        acc.raise_if_non_finite(epoch, failed_elsewhere=failed_elsewhere)
        return sums, n_images

    def _micro_step(self, micro: Any, global_count: int, epoch: int,
                    step: int) -> tuple[int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, losses = self.train_step(micro)
        total = sum(losses.values())
        b = int(micro.labels.numel())
        # Each slice's mean loss, scaled so that DDP's average over ranks (and the sum over micro-batches) is the
        # mean over the global batch: exactly 1 when the batch splits evenly and nothing accumulates.
        scale = b * self.par.world_size / global_count
        (total if scale == 1.0 else total * scale).backward()
        return b, losses, total, logits

    def _global_count(self, batch: Any, step: int) -> int:
        """Images in this step's global batch (all ranks, all micro-batches)."""
        if not self.par.distributed:
            return int(batch.labels.numel())
        return int(self.train_loader.global_batch_size(step))

    def _reduce_sums(self, sums: dict[str, float], local_failed: bool,
                     n_images: int) -> tuple[dict[str, float], int, bool]:
        """Sums and image counts over ranks, and whether another rank saw a non-finite loss: one all-reduce per
        epoch carries all three (no per-step collective)."""
        if not self.par.distributed:
            return sums, n_images, False
        names = sorted(sums)  # every rank runs the same terms, hence the same keys
        values = torch.tensor([sums[k] for k in names] + [float(n_images), float(local_failed)], dtype=torch.float64)
        values = all_reduce_sum(values.to(self.device if self.device.type == "cuda" else "cpu")).cpu().tolist()
        return dict(zip(names, values[:-2])), int(values[-2]), values[-1] > 0 and not local_failed


class EpochAccumulator:
    """Per-epoch loss sums and the first non-finite step, kept on the device; ``read`` is the one host read.

    Sums are float64 (``value.double() * images``, as the host sum of ``float(value) * images`` was), so the
    recorded means do not depend on where they were added up.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.bad_step: Optional[torch.Tensor] = None  # 1-based step of the first non-finite total loss, or 0
        self.bad_values: dict[str, torch.Tensor] = {}  # the loss terms at that step
        self.host: Optional[dict[str, float]] = None
        self.host_bad_step = 0

    def add(self, step: int, images: int, losses: dict[str, torch.Tensor], total: torch.Tensor,
            entropy: torch.Tensor, accuracy: Optional[dict[str, torch.Tensor]] = None) -> None:
        values = {**{name: value.detach() for name, value in losses.items()}, "total": total.detach(),
                  "entropy": entropy.detach(), **(accuracy or {})}
        for name, value in values.items():
            weighted = value.to(torch.float64) * images
            self.sums[name] = weighted if name not in self.sums else self.sums[name] + weighted
        if self.bad_step is None:
            self.bad_step = torch.zeros((), dtype=torch.int64, device=total.device)
        first = torch.logical_and(~torch.isfinite(total.detach()), self.bad_step == 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        for name, value in losses.items():
            value = value.detach().to(torch.float64)
            old = self.bad_values.get(name)
            self.bad_values[name] = torch.where(first, value, value if old is None else old)

    def read(self) -> tuple[dict[str, float], bool]:
        """(sums, whether a non-finite loss occurred) as host values: one device read for the whole epoch."""
        if self.host is None:
            names = list(self.sums)
            if not names:
                self.host, self.host_bad_step = {}, 0
            else:
                packed = torch.stack([self.sums[n] for n in names] + [self.bad_step.to(torch.float64)]).tolist()
                self.host, self.host_bad_step = dict(zip(names, packed[:-1])), int(packed[-1])
        return self.host, self.host_bad_step > 0

    def raise_if_non_finite(self, epoch: int, failed_elsewhere: bool = False,
                            from_error: Optional[BaseException] = None) -> None:
        _, failed = self.read()
        if failed:
            step = self.host_bad_step
            names = list(self.bad_values)
            values = dict(zip(names, torch.stack([self.bad_values[n] for n in names]).tolist() if names else []))
            raise RunFailed(f"non-finite loss at epoch {epoch}, step {step}: {values}",
                            epoch=epoch, step=step, losses=values) from from_error
        if failed_elsewhere:
            raise RunFailed(f"non-finite loss at epoch {epoch} on another process", epoch=epoch)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Load every tensor whose name and shape match (a new classifier for another class count stays fresh);
    returns how many were loaded and the model's tensors left at their initialisation."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ReproError("the initial weights share no tensor with the model: wrong architecture?")
    model.load_state_dict(matching, strict=False)
    return len(matching), [k for k in own if k not in matching]


def train_run(config: dict[str, Any], store: RunFiles, run_id: str, device: torch.device, resolved: Resolved,
              progress: bool = True, options: Optional[ScaleOptions] = None) -> dict[str, Any]:
    """Train (or resume) one run and return its result fields (without the environment stamp).

    Inside a process group every rank calls this; the returned fields are the same on every rank (except the
    non-deterministic kernels each rank saw; rank 0 writes its own)."""
    trainer = Trainer(config, store, run_id, device, resolved, progress, options)
    with numerics.record_nondeterministic_kernels() as trainer.kernels:  # checkpointed: a resume keeps them
        try:
            result = trainer.run()
        except RunFailed as failure:
            if trainer.kernels:
                failure.details["deviations"] = failure.details.get("deviations", []) + trainer.kernels
            raise
    return {**result, "deviations": result["deviations"] + trainer.kernels}


def evaluate_model(model: nn.Module, recipe_dict: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of a model on the recipe's test split (the teacher-accuracy gate uses it); split across the
    ranks of a process group when the test loader can be."""
    recipe = TrainRecipe.model_validate(recipe_dict)
    set_backend_flags(recipe, device)  # the teacher runs under the recipe's TF32/determinism, as stamped
    data = build_pipeline(recipe, 0, device)
    loader, sharded = shard_for_evaluation(data.test)
    return evaluate(model.to(device), loader, sharded=sharded)


def stamp(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {**result, **environment(device)}

