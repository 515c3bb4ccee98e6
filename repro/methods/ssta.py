"""SSTA's head-level attention distillation (Wu et al., ICML 2022) and DeiT's logit distillation.

``ssta_attn``:  ``beta * KL(A_T || A_S) + lam * KL(A_TA || A_S)`` where ``A_T`` is one head of the supervised
teacher, ``A_TA`` one head of the self-supervised teaching assistant and ``A_S`` the student's matching map
(ssta.md 2.3). The paper's code and text were not available, so every choice is a parameter [INFERRED]:
* heads and layers: the term takes plain indices; "auto" selection runs before training
  (``repro.ssta.select_heads_cached``) and its result is written into the term's parameters;
* student mapping: ``split`` (student head ``student_heads[0]`` <-> teacher, ``student_heads[1]`` <-> TA),
  ``relation`` (one MiniLMv2-style map from the concatenated q/k of all heads) or ``mean`` (mean head map);
* KL over keys, averaged over query rows and batch, teacher as target, float32; optional temperature on the
  scores of both sides, without a tau^2 factor (tau = 1 by default; unknown in the paper);
* early stop [SEED reading, ssta.md 2.3.5]: ``stop_epoch`` (``ta_stop_epoch``) is the number of epochs with the
  teacher (TA) term: it is applied in 1-based epochs ``1..stop_epoch`` (DeiT's 0-based ``< stop_epoch``) and
  ``active(epoch)`` is False afterwards, so the loop skips the term and neither model runs.
The spec weights this term as a whole (``ssta_attn: {weight: 1, beta: 1, lam: 1}``) next to ``ce``.
Other parameters: ``student_layer`` / ``teacher_layer`` / ``ta_layer`` (default -1, last-to-last),
``teacher`` / ``ta`` (where the frozen models come from: "teacher" is the run's teacher, any other name an
entry of ``ctx.assistants``, so a CNN can be the run's logit teacher while a ViT teaches attention) and
``drop_dist_token`` (a DeiT-distilled student's 198-token map loses the dist token's row and column and is
renormalised, ssta.md 8.2).

``needs_teacher = False``: the term runs the teacher and TA itself, under ``no_grad`` and in eval mode, on the
student's own augmented batch (``batch.images``, DeiT's convention, ssta.md 8.8), and only while active; the
Distiller's teacher forward would give logits, which this term does not use.

``deit_hard`` / ``deit_soft``: DeiT's distillation through the student's dist token (facebookresearch/deit
``losses.py``, ssta.md 3.1): hard = CE(dist logits, argmax of the teacher's logits); soft = KL at temperature
tau normalised by ``numel`` as DeiT does (ssta.md 8.7). DeiT's ``(1 - alpha) * CE + alpha * KD`` is spec weights,
e.g. ``{ce: 0.5, deit_hard: 0.5}``; the cls-head logits go to CE (see ``repro/models/vit.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.errors import ReproError
from repro.methods.base import LOSS_TERMS, Batch, LossTerm, Outputs, TermContext
from repro.ssta.attention import AttentionCapture, attention_kl
from repro.ssta.head_importance import HeadSelection

STUDENT_MAPPINGS = {"split": "heads", "relation": "relation", "mean": "mean"}


def _epoch_on(stop_epoch: Optional[int], epoch: int) -> bool:
    return stop_epoch is None or epoch <= stop_epoch


def _frozen_model(ctx: TermContext, source: str) -> nn.Module:
    model = ctx.teacher if source == "teacher" else ctx.assistants.get(source)
    if model is None:
        where = "the run's teacher" if source == "teacher" else f"assistant {source!r} (known: {sorted(ctx.assistants)})"
        raise ReproError(f"ssta_attn needs {where}, which is missing")
    return model


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReproError(f"ssta_attn: {what} must be an integer index, got {value!r}; resolve 'auto' with "
                         f"repro.ssta.select_heads_cached before building the term")
    return value


def selection_params(teacher: Optional[HeadSelection] = None, ta: Optional[HeadSelection] = None) -> dict[str, int]:
    """The ``ssta_attn`` parameters that pin the heads chosen before training ("auto" in a spec)."""
    params: dict[str, int] = {}
    for prefix, selection in (("teacher", teacher), ("ta", ta)):
        if selection is not None:
            params[f"{prefix}_layer"], params[f"{prefix}_head"] = selection.layer, selection.head
    return params


@dataclass
class _AttentionTarget:
    """One frozen model (teacher or TA), the capture of its chosen head and how it enters the loss."""

    name: str
    model: nn.Module
    capture: AttentionCapture
    weight: float
    stop_epoch: Optional[int]
    student_slot: int  # which student map (split mapping) or 0

    def active(self, epoch: int) -> bool:
        return self.weight != 0 and _epoch_on(self.stop_epoch, epoch)

    def log_maps(self, images: Tensor) -> Tensor:
        self.model.eval()
        self.capture.enabled = True
        try:
            with torch.no_grad():
                self.model(images)
        finally:
            self.capture.enabled = False
        return self.capture.pop()


@LOSS_TERMS.register("ssta_attn")
class SSTAAttention(LossTerm):
    needs_teacher = False  # runs teacher and TA itself (see module docstring)

    def __init__(self, ctx: TermContext, beta: float = 1.0, lam: float = 1.0, student_layer: int = -1,
                 student_heads: Sequence[int] = (0, 1), mapping: str = "split", teacher_layer: int = -1,
                 teacher_head: int = 0, ta_layer: int = -1, ta_head: int = 0, temperature: float = 1.0,
                 stop_epoch: Optional[int] = None, ta_stop_epoch: Optional[int | str] = "same",
                 drop_dist_token: bool = True, teacher: str = "teacher", ta: str = "ta") -> None:
        super().__init__(ctx)
        if mapping not in STUDENT_MAPPINGS:
            raise ReproError(f"ssta_attn: unknown student mapping {mapping!r}; known: {', '.join(STUDENT_MAPPINGS)}")
        ta_stop_epoch = stop_epoch if ta_stop_epoch == "same" else ta_stop_epoch  # "same": one early stop for both
        # role 0 = teacher, role 1 = TA; under the split mapping role r is matched by student_heads[r]
        wanted = [(role, name, float(w), source, _index(layer, f"{name}_layer"), _index(head, f"{name}_head"), stop)
                  for role, (name, w, source, layer, head, stop) in enumerate((
                      ("teacher", beta, teacher, teacher_layer, teacher_head, stop_epoch),
                      ("ta", lam, ta, ta_layer, ta_head, ta_stop_epoch))) if float(w) != 0.0]
        if not wanted:
            raise ReproError("ssta_attn: beta and lam are both 0; drop the term instead")
        student_heads = [_index(h, "student_heads entry") for h in student_heads]
        if mapping == "split" and len(student_heads) <= wanted[-1][0]:
            raise ReproError(f"ssta_attn: the split mapping needs student_heads = [head for the teacher, head for "
                             f"the TA], got {student_heads}")
        self.mapping = mapping
        # Plain attributes (not submodules): the frozen models must stay out of the optimiser and state dict.
        self._targets: list[_AttentionTarget] = []
        for role, name, weight, source, layer, head, stop in wanted:
            model = _frozen_model(ctx, source)
            capture = AttentionCapture(model, layer, [head], "heads", temperature, drop_dist_token)
            capture.enabled = False  # armed only inside this term's own forward of that model
            self._targets.append(_AttentionTarget(name, model, capture, weight, stop,
                                                  role if mapping == "split" else 0))
        self._student_capture = AttentionCapture(ctx.student, student_layer,
                                                 student_heads[:2] if mapping == "split" else None,
                                                 STUDENT_MAPPINGS[mapping], temperature, drop_dist_token,
                                                 training_only=True)

    def active(self, epoch: int) -> bool:
        on = any(target.active(epoch) for target in self._targets)
        self._student_capture.enabled = on  # after the early stop the student forward computes no maps either
        return on

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        student_maps = self._student_capture.pop()
        loss = student_maps.new_zeros(())
        for target in self._targets:
            if target.active(batch.epoch):
                slot = slice(target.student_slot, target.student_slot + 1)
                loss = loss + target.weight * attention_kl(target.log_maps(batch.images), student_maps[:, slot])
        return loss

    def remove_hooks(self) -> None:
        for capture in [self._student_capture] + [t.capture for t in self._targets]:
            capture.remove()


class _DistTokenTerm(LossTerm):
    """Reads the student's dist-head logits through a forward hook on ``vit.head_dist`` (training only)."""

    def __init__(self, ctx: TermContext) -> None:
        super().__init__(ctx)
        student = ctx.student
        if not getattr(student, "is_distilled", False):
            raise ReproError(f"{type(self).__name__} needs a distilled ViT student (with a dist token), got "
                             f"{type(getattr(student, 'vit', student)).__name__}")
        student.set_distilled_training(True)  # training forward: cls head -> CE, dist head -> this term
        self._dist_logits: Optional[Tensor] = None
        student.vit.head_dist.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training:
            self._dist_logits = output

    def _pop(self) -> Tensor:
        if self._dist_logits is None:
            raise RuntimeError("no dist-token logits were captured (was the student run in training mode?)")
        logits, self._dist_logits = self._dist_logits, None
        return logits.float()


@LOSS_TERMS.register("deit_hard")
class DeiTHardDistillation(_DistTokenTerm):
    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        return F.cross_entropy(self._pop(), out.teacher_logits.argmax(dim=1))


@LOSS_TERMS.register("deit_soft")
class DeiTSoftDistillation(_DistTokenTerm):
    def __init__(self, ctx: TermContext, temperature: float = 1.0) -> None:
        super().__init__(ctx)
        self.temperature = float(temperature)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        t = self.temperature
        student = F.log_softmax(self._pop() / t, dim=1)
        teacher = F.log_softmax(out.teacher_logits.float() / t, dim=1)
        # DeiT divides the summed KL by numel (batch x classes), not by the batch size (deit issue #61).
        return F.kl_div(student, teacher, reduction="sum", log_target=True) * (t * t) / student.numel()
