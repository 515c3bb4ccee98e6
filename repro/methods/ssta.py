"""SSTA's head-level attention distillation (Wu et al., ICML 2022) and DeiT's logit distillation.

``ssta_attn``:  ``beta * KL(A_T || A_S) + lam * KL(A_TA || A_S)`` where ``A_T`` is one head of the supervised
teacher, ``A_TA`` one head of the self-supervised teaching assistant and ``A_S`` the student's matching map
(ssta.md 2.3). The paper's code and text were not available, so every choice is a parameter [INFERRED]:
* heads and layers: ``teacher_head`` / ``ta_head`` are ``auto`` (default), a head index, or a list of heads
  (their mean map is the target); ``teacher_layer`` / ``ta_layer`` are an index (default -1, the last block)
  or ``auto`` (the best-scoring head over all layers). ``auto`` is resolved once, in this term's constructor,
  by ``head_rule`` (any ``repro.methods.head_importance.SELECTION_RULES`` entry: ``importance`` (default, Michel
  et al. 2019), ``entropy``, ``fixed``, ``all``, ``random``; extra rule options in ``head_options``) over
  ``head_batches`` training batches (``ctx.sample_batches``: the run's own augmented, mixed batches, whose soft
  targets the cross-entropy importance uses). Importance is Michel et al.'s mean over examples of
  ``|dL(x)/dmask|``: each gradient is taken over ``importance_batch`` images (default 1, per example, so that
  examples pulling a head in opposite directions do not cancel). The importance loss is a recorded choice per
  model: ``teacher_importance_loss`` (``ce`` through the teacher's classifier, default) and ``ta_importance_loss``
  (``auto``, default: ``probe`` when a published linear probe is given as ``ta_probe: {checkpoint: <file>,
  n_last_blocks: 4, avgpool: false}``, DINO's ``eval_linear.py`` layout, else ``feature``: a label-free TA has
  no classifier). The selection is cached in ``ctx.cache_dir`` (``heads-<rule>-<key>.json``), keyed by the
  model's weights, the first sampled batch (so the dataset and the run's seed) and the rule's options
  (``importance_batch`` included); the global RNGs are restored afterwards, so training is the same whether the
  selection was computed or read. Under torch.distributed rank 0 chooses and broadcasts, so every rank distils
  the same heads. The chosen heads, their scores and the rule are logged and returned by ``report()``, which the
  training loop writes into the run's result.json (``term_reports``);
* student mapping: ``split`` (student head ``student_heads[0]`` <-> teacher, ``student_heads[1]`` <-> TA),
  ``relation`` (one MiniLMv2-style map from the concatenated q/k of all heads) or ``mean`` (mean head map);
* KL over keys, averaged over query rows and batch, teacher as target, float32; optional temperature on the
  scores of both sides, without a tau^2 factor (tau = 1 by default; unknown in the paper);
* early stop [SEED reading, ssta.md 2.3.5]: ``stop_epoch`` (``ta_stop_epoch``) is the number of epochs with the
  teacher (TA) term: it is applied in 1-based epochs ``1..stop_epoch`` (DeiT's 0-based ``< stop_epoch``) and
  ``active(epoch)`` is False afterwards, so the loop skips the term and neither model runs. With
  ``stop_epoch_of: N`` the stop epochs are the paper's "stop_epoch of N" and scale to the run's epochs
  (``max(1, round(stop_epoch * epochs / N))``), so one spec cell means the same at every tier.
The spec weights this term as a whole (``ssta_attn: {weight: 1, beta: 1, lam: 1}``) next to ``ce``.
``reading`` (XCiT, ssta.md 8.3; ``repro.methods.attention_readings.READINGS``): which attention is distilled, the same for
student, teacher and TA: ``auto`` (default: the student family's own, ``token`` for ViTs, ``class_attention`` for
XCiT), ``xca`` (XCA channel maps; equal head dimensions only), ``class_attention`` (the CLS -> token row of a
class-attention block) or ``xca_tokens`` (a token map from an XCA block's q and k); layers count within the reading.
Other parameters: ``student_layer`` (default -1, last-to-last), ``teacher`` / ``ta`` (where the frozen models
come from: "teacher" is the run's teacher, any other name an entry of ``ctx.assistants``, so a CNN can be the
run's logit teacher while a ViT teaches attention) and ``drop_dist_token`` (a DeiT-distilled student's 198-token
map loses the dist token's row and column and is renormalised, ssta.md 8.2).

``needs_teacher = False``: the term runs the teacher and TA itself, under ``no_grad`` and in eval mode, on the
student's own augmented batch (``batch.images``, DeiT's convention, ssta.md 8.8), and only while active; the
Distiller's teacher forward would give logits, which this term does not use.

``deit_hard`` / ``deit_soft``: DeiT's distillation through the student's dist token (facebookresearch/deit
``losses.py``, ssta.md 3.1): hard = CE(dist logits, argmax of the teacher's logits); soft = KL at temperature
tau normalised by ``numel`` as DeiT does (ssta.md 8.7). DeiT's ``(1 - alpha) * CE + alpha * KD`` is spec weights,
e.g. ``{ce: 0.5, deit_hard: 0.5}``; the cls-head logits go to CE (see ``repro/models/vit.py``).
"""
# Longer than ~400 lines on purpose: two terms (ssta_attn, deit_hard) and the parsing of SSTA's inferred choices they share; apart, each choice's validation would sit away from its use.
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.domains import (BOOLEAN, NONNEGATIVE, POSITIVE, POSITIVE_EPOCHS, POSITIVE_INT, one_of, optional,
                            or_values)
from repro.core.errors import ReproError
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext
from repro.methods.attention_readings import READINGS, AttentionCapture, attention_kl, resolve_reading
from repro.methods.head_importance import (
    SELECTION_RULES,
    HeadSelection,
    load_linear_probe,
    model_fingerprint,
    preserved_rng,
    select_heads,
    select_heads_cached,
    selection_cache_path,
)

log = logging.getLogger(__name__)

AUTO = "auto"
STUDENT_MAPPINGS = {"split": "heads", "relation": "relation", "mean": "mean"}
# A label-free TA has no classifier, so its importance loss cannot be "ce" (it would read a random head).
IMPORTANCE_LOSSES = {"teacher": ("ce", "probe", "feature"), "ta": ("probe", "feature")}
PROBE_KEYS = {"checkpoint", "n_last_blocks", "avgpool"}

HeadSpec = Union[int, Sequence[int], str]


def _epoch_on(stop_epoch: Optional[int], epoch: int) -> bool:
    return stop_epoch is None or epoch <= stop_epoch


def scaled_stop_epoch(stop_epoch: Optional[int], of_epochs: Optional[int], epochs: int) -> Optional[int]:
    """The stop epoch of a run with ``epochs`` epochs, for a paper's "stop_epoch of of_epochs" (or as given)."""
    if stop_epoch is None or of_epochs is None:
        return stop_epoch
    return max(1, round(stop_epoch * epochs / of_epochs))


def _frozen_model(ctx: TermContext, source: str) -> nn.Module:
    model = ctx.teacher if source == "teacher" else ctx.assistants.get(source)
    if model is None:
        where = "the run's teacher" if source == "teacher" else f"assistant {source!r} (known: {sorted(ctx.assistants)})"
        raise ReproError(f"ssta_attn needs {where}, which is missing")
    return model


def _check_reading(model: nn.Module, reading: str, role: str) -> None:
    try:
        resolve_reading(model, reading)
    except ReproError as err:
        raise ReproError(f"ssta_attn: the {role} cannot be read the student's way: {err}") from None


def _head_dim(attn: nn.Module) -> int:
    return attn.proj.in_features // attn.num_heads


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReproError(f"ssta_attn: {what} must be an integer index or 'auto', got {value!r}")
    return value


def _heads_list(value: HeadSpec, what: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ReproError(f"ssta_attn: {what} is an empty list")
        return [_index(h, f"{what} entry") for h in value]
    return [_index(value, what)]


def selection_params(teacher: Optional[HeadSelection] = None, ta: Optional[HeadSelection] = None) -> dict[str, int]:
    """The ``ssta_attn`` parameters that pin heads chosen elsewhere (instead of ``auto``)."""
    params: dict[str, int] = {}
    for prefix, selection in (("teacher", teacher), ("ta", ta)):
        if selection is not None:
            params[f"{prefix}_layer"], params[f"{prefix}_head"] = selection.layer, selection.head
    return params


# ----------------------------------------------------------------------------------------------------------
# head choice

@dataclass
class HeadChoice:
    """The layer and heads whose attention one frozen model contributes, and how they were chosen."""

    layer: int
    heads: list[int]
    record: dict[str, Any] = field(default_factory=dict)  # JSON-able: rule, loss, scores, cache file


def _tensor_digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}:{flat.dtype}".encode())
        digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class HeadChooser:
    """Resolves ``auto`` heads of the teacher and TA from a few training batches of the run (ssta.md 2.3.1)."""

    def __init__(self, ctx: TermContext, rule: str, batches: int, options: Optional[dict[str, Any]],
                 importance_batch: int = 1) -> None:
        for name, value in (("head_batches", batches), ("importance_batch", importance_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReproError(f"ssta_attn: {name} must be a positive integer, got {value!r}")
        reserved = {"scope", "layer", "loss", "probe", "max_images", "sample_batches",
                    "importance_batch"} & set(options or {})
        if reserved:
            raise ReproError(f"ssta_attn: head_options may not set {sorted(reserved)}; they are term parameters")
        self.ctx = ctx
        self.rule = rule
        self.batches = batches
        self.options = dict(options or {})
        if rule == "importance":
            # Images per importance gradient: a recorded choice, part of the selection's cache key and report.
            self.options["importance_batch"] = importance_batch
        self._labels_digest: Optional[str] = None

    def choose(self, role: str, model: nn.Module, layer: Union[int, str], head: HeadSpec, loss: str,
               probe: Optional[dict[str, Any]]) -> HeadChoice:
        """The choice for one model; under torch.distributed rank 0 chooses (each rank sees another shard of
        the data) and every rank receives its choice, so all ranks distil the same heads."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._choose(role, model, layer, head, loss, probe)
        payload: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                payload[0] = self._choose(role, model, layer, head, loss, probe)
            except ReproError as err:  # tell the other ranks instead of leaving them waiting
                payload[0] = err
        device = self.ctx.device if dist.get_backend() == "nccl" else None
        dist.broadcast_object_list(payload, src=0, device=device)
        if isinstance(payload[0], ReproError):
            raise payload[0]
        return payload[0]

    def _choose(self, role: str, model: nn.Module, layer: Union[int, str], head: HeadSpec, loss: str,
                probe: Optional[dict[str, Any]]) -> HeadChoice:
        if head != AUTO:
            if layer == AUTO:
                raise ReproError(f"ssta_attn: {role}_layer 'auto' needs {role}_head 'auto' (a given head needs "
                                 f"a given layer)")
            heads = _heads_list(head, f"{role}_head")
            return HeadChoice(_index(layer, f"{role}_layer"), heads, {"rule": "given", "heads": heads})
        if loss == AUTO:  # a published linear probe where one is given (DINO's), else the label-free loss
            loss = "probe" if probe is not None else "feature"
        if loss not in IMPORTANCE_LOSSES[role]:
            raise ReproError(f"ssta_attn: {role}_importance_loss must be one of {', '.join(IMPORTANCE_LOSSES[role])}, "
                             f"got {loss!r}")
        options = {**self.options, "loss": loss, "max_images": None, "sample_batches": self.batches,
                   "scope": "global" if layer == AUTO else "layer",
                   "layer": -1 if layer == AUTO else _index(layer, f"{role}_layer")}
        if probe is not None:
            options["probe"] = _load_probe(probe, f"{role}_probe").to(self.ctx.device)
        selection, cache_file = self._select(role, model, options)
        if layer == AUTO and selection.scores is None:
            raise ReproError(f"ssta_attn: {role}_layer 'auto' needs a rule that scores heads; {self.rule!r} does not")
        record = {"rule": self.rule, "loss": loss, "scope": options["scope"], "pairs": selection.pairs,
                  "scores": selection.scores[selection.layer] if selection.scores else None,
                  "cache_file": cache_file, **{k: v for k, v in self.options.items()}}
        return HeadChoice(selection.layer, selection.heads_of_layer(), record)

    def _select(self, role: str, model: nn.Module, options: dict[str, Any]) -> tuple[HeadSelection, Optional[str]]:
        if self.ctx.sample_batches is None:
            try:  # rules without images (fixed, all, random) still work, e.g. in unit tests
                return select_heads(model, self.rule, None, **options), None
            except ReproError as err:
                raise ReproError(f"ssta_attn: {role}_head 'auto' (rule {self.rule!r}) needs training images, and "
                                 f"this context has no sample_batches: {err}") from None
        stream = self._batches()
        try:
            with preserved_rng(self.ctx.device):
                first = next(stream, None)
                if first is None:
                    raise ReproError("ssta_attn: the training loader yielded no batch for head selection")
                digest = f"{model_fingerprint(model)}|{self._data_digest(first)}"
                fingerprint = hashlib.sha256(digest.encode()).hexdigest()
                batches = itertools.chain([first], stream)
                if self.ctx.cache_dir is None:
                    return select_heads(model, self.rule, batches, **options), None
                path = selection_cache_path(self.ctx.cache_dir, fingerprint, self.rule, **options)
                return select_heads_cached(self.ctx.cache_dir, model, self.rule, batches, fingerprint,
                                           **options), str(path)
        finally:
            stream.close()  # a cache hit reads one batch: release the loader (and its workers) at once

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Soft (mixup/cutmix) targets when the pipeline mixes: the images the teacher sees in training.
        for batch in self.ctx.sample_batches(self.batches):
            yield batch.images, batch.targets

    def _data_digest(self, first: tuple[Tensor, Tensor]) -> str:
        """The dataset (all training labels) and the run's first batch (seed, order, augmentation)."""
        if self._labels_digest is None:
            self._labels_digest = _tensor_digest(self.ctx.train_labels)
        images, targets = first
        # A strided sample of the pixels: a full ImageNet batch is ~600 MB, and any other seed, order or
        # augmentation changes the targets (labels, mixup pairs and ratio) and these pixels anyway.
        sample = images.reshape(-1)[:: max(1, images.numel() // 65536)]
        return f"{self._labels_digest}|{_tensor_digest(targets, sample)}"


def _load_probe(config: dict[str, Any], what: str) -> nn.Module:
    if not isinstance(config, dict) or "checkpoint" not in config or set(config) - PROBE_KEYS:
        raise ReproError(f"ssta_attn: {what} must be a mapping with 'checkpoint' (and optionally 'n_last_blocks', "
                         f"'avgpool'), got {config!r}")
    return load_linear_probe(config["checkpoint"], int(config.get("n_last_blocks", 1)), bool(config.get("avgpool", False)))


# ----------------------------------------------------------------------------------------------------------
# the term

@dataclass
class _AttentionTarget:
    """One frozen model (teacher or TA), the capture of its chosen head(s) and how it enters the loss."""

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
    needs_teacher_model = True  # ... so the run still needs its teacher
    domains = {"beta": NONNEGATIVE, "lam": NONNEGATIVE, "mapping": one_of(*STUDENT_MAPPINGS),
               "head_rule": one_of(*SELECTION_RULES.names()), "head_batches": POSITIVE_INT,
               "importance_batch": POSITIVE_INT, "teacher_importance_loss": one_of(*IMPORTANCE_LOSSES["teacher"]),
               "ta_importance_loss": one_of(AUTO, *IMPORTANCE_LOSSES["ta"]), "temperature": POSITIVE,
               "stop_epoch": optional(POSITIVE_EPOCHS), "ta_stop_epoch": or_values(optional(POSITIVE_EPOCHS), "same"),
               "stop_epoch_of": optional(POSITIVE_INT), "drop_dist_token": BOOLEAN,
               "reading": one_of(AUTO, *READINGS.names())}

    def __init__(self, ctx: TermContext, beta: float = 1.0, lam: float = 1.0, student_layer: int = -1,
                 student_heads: Sequence[int] = (0, 1), mapping: str = "split",
                 teacher_layer: Union[int, str] = -1, teacher_head: HeadSpec = AUTO,
                 ta_layer: Union[int, str] = -1, ta_head: HeadSpec = AUTO,
                 head_rule: str = "importance", head_batches: int = 4, head_options: Optional[dict[str, Any]] = None,
                 importance_batch: int = 1,
                 teacher_importance_loss: str = "ce", ta_importance_loss: str = AUTO,
                 teacher_probe: Optional[dict[str, Any]] = None, ta_probe: Optional[dict[str, Any]] = None,
                 temperature: float = 1.0, stop_epoch: Optional[int] = None,
                 ta_stop_epoch: Optional[int | str] = "same", stop_epoch_of: Optional[int] = None,
                 drop_dist_token: bool = True, teacher: str = "teacher", ta: str = "ta",
                 reading: str = AUTO) -> None:
        super().__init__(ctx)
        if mapping not in STUDENT_MAPPINGS:
            raise ReproError(f"ssta_attn: unknown student mapping {mapping!r}; known: {', '.join(STUDENT_MAPPINGS)}")
        ta_stop_epoch = stop_epoch if ta_stop_epoch == "same" else ta_stop_epoch  # "same": one early stop for both
        stops = [scaled_stop_epoch(s, stop_epoch_of, ctx.epochs) for s in (stop_epoch, ta_stop_epoch)]
        # role 0 = teacher, role 1 = TA; under the split mapping role r is matched by student_heads[r]
        roles = [(role, name, float(w), source, layer, head, loss, probe, stop)
                 for role, (name, w, source, layer, head, loss, probe, stop) in enumerate((
                     ("teacher", beta, teacher, teacher_layer, teacher_head, teacher_importance_loss, teacher_probe,
                      stops[0]),
                     ("ta", lam, ta, ta_layer, ta_head, ta_importance_loss, ta_probe, stops[1]))) if float(w) != 0.0]
        if not roles:
            raise ReproError("ssta_attn: beta and lam are both 0; drop the term instead")
        student_heads = _heads_list(list(student_heads), "student_heads")
        if mapping == "split" and len(student_heads) <= roles[-1][0]:
            raise ReproError(f"ssta_attn: the split mapping needs student_heads = [head for the teacher, head for "
                             f"the TA], got {student_heads}")
        self.mapping = mapping
        models = {name: _frozen_model(ctx, source) for _, name, _, source, *_ in roles}  # missing models fail first
        # One reading for the student and both targets (auto: the student family's default; ViT: token).
        self.reading = resolve_reading(ctx.student, reading).name
        for name, model in models.items():
            _check_reading(model, self.reading, name)
        if self.reading == "xca" and mapping == "relation":
            raise ReproError("ssta_attn: the relation mapping has no meaning for XCA channel maps; use split or mean")
        # The reading enters the head selection's options (and cache key) only where it is not the ViTs' token.
        options = dict(head_options or {})
        if self.reading != "token":
            options["reading"] = self.reading
        chooser = HeadChooser(ctx, head_rule, head_batches, options, importance_batch)
        self.choices: dict[str, HeadChoice] = {}
        # Plain attributes (not submodules): the frozen models must stay out of the optimiser and state dict.
        self._targets: list[_AttentionTarget] = []
        for role, name, weight, _, layer, head, loss, probe, stop in roles:
            choice = chooser.choose(name, models[name], layer, head, loss, probe)
            self.choices[name] = choice
            capture = AttentionCapture(models[name], choice.layer, choice.heads,
                                       "heads" if len(choice.heads) == 1 else "mean", temperature, drop_dist_token,
                                       reading=self.reading)
            capture.enabled = False  # armed only inside this term's own forward of that model
            self._targets.append(_AttentionTarget(name, models[name], capture, weight, stop,
                                                  role if mapping == "split" else 0))
        self._student_capture = AttentionCapture(ctx.student, student_layer,
                                                 student_heads[:2] if mapping == "split" else None,
                                                 STUDENT_MAPPINGS[mapping], temperature, drop_dist_token,
                                                 training_only=True, reading=self.reading)
        self.stop_epochs = {t.name: t.stop_epoch for t in self._targets}
        if self.reading == "xca":  # channel maps are d_h x d_h: only equal head dimensions compare
            widths = {t.name: _head_dim(t.capture.attn) for t in self._targets}
            student_dim = _head_dim(self._student_capture.attn)
            if any(w != student_dim for w in widths.values()):
                raise ReproError(f"ssta_attn: reading 'xca' compares d_h x d_h channel maps, but the student's head "
                                 f"dimension is {student_dim} and {widths}; use class_attention or xca_tokens")
        for name, choice in self.choices.items():
            log.info("ssta_attn: %s %s attention from layer %d, heads %s (%s)", name, self.reading, choice.layer,
                     choice.heads, choice.record.get("rule"))

    def report(self) -> dict[str, Any]:
        """What this term decided before training (for the run's result.json)."""
        return {"heads": {name: {"layer": c.layer, "heads": c.heads, **c.record} for name, c in self.choices.items()},
                "stop_epochs": self.stop_epochs, "reading": self.reading}

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
        # DeiT: the dist token's head; XCiT: its one head (xcit.py returns (x, x) in training)
        student.dist_head.register_forward_hook(self._record)

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
    domains = {"temperature": POSITIVE}

    def __init__(self, ctx: TermContext, temperature: float = 1.0) -> None:
        super().__init__(ctx)
        self.temperature = float(temperature)

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        t = self.temperature
        student = F.log_softmax(self._pop() / t, dim=1)
        teacher = F.log_softmax(out.teacher_logits.float() / t, dim=1)
        # DeiT divides the summed KL by numel (batch x classes), not by the batch size (deit issue #61).
        return F.kl_div(student, teacher, reduction="sum", log_target=True) * (t * t) / student.numel()
