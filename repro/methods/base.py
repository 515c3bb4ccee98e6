"""The distiller contract.

A paper row ("KD", "WTTM+CRD", ...) is data: a weighted sum of registered *loss terms* written in the spec,
e.g. ``{ce: 1.0, wttm: {weight: 4, gamma: 0.2}, crd: {weight: 0.8}}``. Each term is one small class in
``repro/methods/<name>.py`` registered in ``LOSS_TERMS``; adding a KD method is one file plus spec rows.

``Distiller.forward_train(batch)`` returns ``(student_logits, {term name: weighted loss})`` in the spirit of
mdistiller: the training loop sums the dict and logs each entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn
from torch import Tensor

from repro.data.batch import Batch
from repro.core.domains import Domain
from repro.core.errors import ReproError
from repro.core.registry import Registry


@dataclass
class Outputs:
    """What the terms see: the student's output and, when any active term needs it, the teacher's."""

    logits: Tensor
    feats: Optional[list[Tensor]] = None
    teacher_logits: Optional[Tensor] = None
    teacher_feats: Optional[list[Optional[Tensor]]] = None  # None in places the teacher cache does not hold


@dataclass
class TermContext:
    """Everything a term may need at construction time; filled by the training loop."""

    student: nn.Module
    teacher: Optional[nn.Module]
    num_classes: int
    train_labels: Tensor  # labels of the whole training set, in dataset-index order
    device: torch.device
    epochs: int
    image_size: int = 32
    assistants: dict[str, nn.Module] = field(default_factory=dict)  # extra frozen models (SSTA's TA)
    student_feat_dims: list[int] = field(default_factory=list)  # channel/width of each feature (probe forward)
    teacher_feat_dims: list[int] = field(default_factory=list)
    # Per-sample shape of each feature, e.g. (C, H, W) or (D,), from the same probe forward: what connectors
    # between student and teacher feature maps (FitNet's regressor, VID's) are built from.
    student_feat_shapes: list[tuple[int, ...]] = field(default_factory=list)
    teacher_feat_shapes: list[tuple[int, ...]] = field(default_factory=list)
    # Training batches for offline analyses a term runs once at construction (SSTA's head importance):
    # ``sample_batches(n)`` yields n augmented training batches without disturbing the training order.
    sample_batches: Optional[Callable[[int], Any]] = None
    cache_dir: Optional[Path] = None  # where a term may cache such analyses (keyed by what they depend on)


def feature_shapes(ctx: TermContext, term: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(student, teacher) per-sample feature shapes from the training loop's probe forward; a term that builds
    connectors from them cannot be constructed without."""
    if not ctx.student_feat_shapes or not ctx.teacher_feat_shapes:
        raise ReproError(f"{term} needs the feature shapes of student and teacher (TermContext.*_feat_shapes)")
    return list(ctx.student_feat_shapes), list(ctx.teacher_feat_shapes)


@dataclass
class InitStage:
    """A stage a term trains before epoch 1 (RepDistiller ``helper/pretrain.py init``, for AB, FT and FSP).

    The training loop runs it with a fresh optimizer of the recipe's kind (SGD with the recipe's momentum and
    weight decay for the CIFAR recipes) at a constant ``lr`` for ``epochs`` epochs, minimising the term's
    ``init_loss``; only ``modules`` and, when ``trains_student``, the student without its classifier
    (RepDistiller's ``get_feat_modules``) are optimised. The stage is part of the run: its epochs are
    checkpointed, logged and resumed like the training epochs.
    """

    epochs: int
    modules: list[nn.Module] = field(default_factory=list)  # the term's own modules trained in the stage
    trains_student: bool = False  # the student's feature layers train too (in train mode); else it stays in eval
    lr: Optional[float] = None  # None: the run's base learning rate


class LossTerm(nn.Module):
    """One registered loss term. Subclasses set the class attributes and implement ``forward``.

    ``forward`` returns the *unweighted* batch loss (a scalar); the distiller applies the spec's weight.
    Trainable parameters of a term (e.g. CRD's embedding heads) are optimised with the student.
    ``domains`` declares the values each constructor parameter may take; ``repro.harness.spec`` checks every cell's
    parameters (given or default) against them when the spec loads.
    """

    needs_teacher: ClassVar[bool] = True  # the Distiller runs the teacher and hands its outputs to the term
    # Whether the run needs a teacher model at all (None: as needs_teacher). A term that runs the teacher itself
    # (SSTA's attention term) needs the model without asking the Distiller for its outputs.
    needs_teacher_model: ClassVar[Optional[bool]] = None
    features: ClassVar[Optional[str]] = None  # None, "feat" (post-activation) or "preact"
    # Which teacher features the term reads: "all" (any place of ``out.teacher_feats``) or "last" (only
    # ``out.teacher_feats[-1]``, the pooled penultimate vector). The teacher-output cache can hold that one
    # (``TrainRecipe.teacher_cache_features``); it then hands the term None in every other place.
    reads_teacher_features: ClassVar[str] = "all"
    domains: ClassVar[dict[str, Domain]] = {}

    @classmethod
    def requires_teacher_model(cls) -> bool:
        return cls.needs_teacher if cls.needs_teacher_model is None else cls.needs_teacher_model

    @classmethod
    def planned_init_epochs(cls, params: dict[str, Any]) -> int:
        """Epochs of the initialisation stage a term built with ``params`` runs, for cost estimates: its
        ``init_epochs`` constructor parameter, given or default (0 for a term without one)."""
        import inspect

        parameter = inspect.signature(cls.__init__).parameters.get("init_epochs")
        if parameter is None:
            return 0
        value = params.get("init_epochs", parameter.default)
        return int(value) if isinstance(value, (int, float)) else 0

    def __init__(self, ctx: TermContext, **params: Any) -> None:
        super().__init__()
        if params:
            raise ReproError(f"loss term {type(self).__name__} got unknown parameters: {sorted(params)}")

    def active(self, epoch: int) -> bool:
        """Whether the term contributes at this (1-based) epoch; SSTA's early stop overrides it."""
        return True

    def trainable_modules(self) -> list[nn.Module]:
        """The term's modules optimised with the student during training (all of it by default); a module trained
        only in an initialisation stage and frozen afterwards (FT's paraphraser) is left out."""
        return [self]

    def init_stage(self) -> Optional[InitStage]:
        """The stage this term trains before epoch 1, if any (None for most terms)."""
        return None

    def init_loss(self, out: Outputs, batch: Batch) -> Tensor:
        """The unweighted loss of the initialisation stage (features of the term's kind in ``out``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no initialisation stage")

    def report(self) -> dict[str, Any]:
        """What the term decided or derived before training that a reader of the run must see (SSTA's chosen
        heads, WTTM's mean-U rescale), written into the run's ``result.json`` under ``term_reports``; empty for
        most terms."""
        return {}

    def forward(self, out: Outputs, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


LOSS_TERMS: Registry[type[LossTerm]] = Registry("loss term", package="repro.methods")

TeacherFn = Callable[[Batch, bool, bool], tuple[Tensor, Optional[list[Optional[Tensor]]]]]


def forward_model(model: nn.Module, images: Tensor, feats: bool, preact: bool) -> tuple[Tensor, Optional[list[Tensor]]]:
    """Call a model under the feature contract of ``repro.models``."""
    if not feats:
        return model(images), None
    features, logits = model(images, is_feat=True, preact=preact)
    return logits, list(features)


class Distiller(nn.Module):
    """Student + frozen teacher + weighted loss terms."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], terms: dict[str, tuple[float, LossTerm]],
                 teacher_fn: Optional[TeacherFn] = None) -> None:
        super().__init__()
        self.student = student
        # The teacher is kept out of the module tree: it is never optimised, never weight-decayed, never saved.
        object.__setattr__(self, "teacher", teacher)
        self.terms = nn.ModuleDict({name: term for name, (_, term) in terms.items()})
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        kinds = {t.features for t in self.terms.values() if t.features}
        if len(kinds) > 1:
            raise ReproError(f"loss terms ask for incompatible feature kinds: {sorted(kinds)}")
        self.feature_kind = kinds.pop() if kinds else None
        if any(t.needs_teacher for t in self.terms.values()) and teacher is None and teacher_fn is None:
            raise ReproError("a loss term needs a teacher but the run has none")
        self.teacher_fn = teacher_fn or self._live_teacher

    def _live_teacher(self, batch: Batch, feats: bool, preact: bool) -> tuple[Tensor, Optional[list[Tensor]]]:
        assert self.teacher is not None
        self.teacher.eval()
        with torch.no_grad():
            return forward_model(self.teacher, batch.images, feats, preact)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # running BN statistics, as the official loops do every epoch
        return self

    def forward_train(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        active = {name: term for name, term in self.terms.items() if term.active(batch.epoch)}
        want_feats = self.feature_kind is not None and any(t.features for t in active.values())
        preact = self.feature_kind == "preact"
        logits, feats = forward_model(self.student, batch.images, want_feats, preact)
        out = Outputs(logits=logits, feats=feats)
        if any(t.needs_teacher for t in active.values()):
            out.teacher_logits, out.teacher_feats = self.teacher_fn(batch, want_feats, preact)
        losses = {name: self.weights[name] * term(out, batch) for name, term in active.items()}
        return logits, losses
