"""Which teacher/TA head to distil: SSTA picks "the most important head" of each model (ssta.md 2.3.1).

Default rule [INFERRED]: Michel et al. 2019 gradient importance. A head mask xi (ones, requires_grad, [L, H])
multiplies each head's context vector just before the block's output projection; Michel et al. define the
importance as the mean over examples of ``|dL(x)/dxi[l, h]|``, so we take one gradient per ``importance_batch``
images (default 1: per example; a whole 1,024-image batch would let per-example gradients of opposite sign
cancel), average their absolute values over the N images, then L2-normalise each layer (HF's bertology example)
and take the argmax of the last layer (options: over all layers, or one head per layer).

The loss L [open choice, recorded in the cache key]:
* ``ce``: cross-entropy through the model's own classifier (a supervised teacher);
* ``probe``: cross-entropy through a linear probe given by the caller on the pooled features, or on DINO's
  linear-evaluation features (:class:`FeatureProbe`, :func:`load_linear_probe`; DINO and MoCo-v3 publish their
  probes) -- for an SSL TA without a classifier;
* ``feature``: label-free, ``1 - cos(f(x), f(flip(x)))`` with the flipped view as a fixed target: how much a head
  matters for the model's own flip-invariant representation (for MAE-like TAs without a probe).

Alternative rules for ablations: ``entropy`` (mean attention entropy per head; the lowest, most focused head by
default), ``fixed``, ``all`` (every head of one layer) and ``random`` (seeded).

The selection is computed once before training and frozen; ``select_heads_cached`` stores it as a small JSON
file keyed by the model's fingerprint (weights or checkpoint hash) and the rule's full configuration.
Labels may be hard (int64 [B]) or soft (float [B, K], e.g. mixup/cutmix targets): cross-entropy takes both.
``preserved_rng`` lets a caller draw training batches for the selection without moving any global RNG.
"""
# Longer than ~400 lines on purpose: one algorithm (gradient head importance, its probe and its cache) whose [INFERRED] choices are documented in one place.
from __future__ import annotations

import hashlib
import json
import os
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from repro.core.io import atomic_write_text, read_checkpoint, unwrap_state_dict
from repro.core.errors import ReproError
from repro.core.registry import Registry
from repro.methods.attention_readings import AttentionCapture, attention_modules, block_attention, depth, unwrap_vit

SCOPES = ("last", "layer", "global", "per_layer")
Pair = tuple[int, int]  # (layer, head), layer counted from 0


@dataclass
class HeadSelection:
    """The chosen (layer, head) pairs, the rule that chose them and its per-head scores ([L][H], if any)."""

    rule: str
    pairs: list[Pair]
    scores: Optional[list[list[float]]] = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        """The one layer all pairs lie in."""
        layers = {layer for layer, _ in self.pairs}
        if len(layers) != 1:
            raise ReproError(f"head selection '{self.rule}' spans layers {sorted(layers)}, not one layer")
        return layers.pop()

    @property
    def head(self) -> int:
        """The one selected head."""
        if len(self.pairs) != 1:
            raise ReproError(f"head selection '{self.rule}' holds {len(self.pairs)} heads, not one")
        return self.pairs[0][1]

    def heads_of_layer(self) -> list[int]:
        self.layer  # noqa: B018 - raises unless all pairs share one layer
        return [head for _, head in self.pairs]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HeadSelection":
        return cls(rule=data["rule"], pairs=[(int(l), int(h)) for l, h in data["pairs"]],
                   scores=data.get("scores"), config=data.get("config", {}))


# ----------------------------------------------------------------------------------------------------------
# inputs

def _images_labels(item: Any) -> tuple[Tensor, Optional[Tensor]]:
    """Accept ``Batch`` objects or ``(images, labels)`` tuples."""
    if hasattr(item, "images"):
        return item.images, getattr(item, "labels", None)
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _iter_limited(batches: Iterable[Any], max_images: Optional[int], device: torch.device
                  ) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    seen = 0
    for item in batches:
        images, labels = _images_labels(item)
        if max_images is not None:
            images = images[: max_images - seen]
            labels = None if labels is None else labels[: images.shape[0]]
        if images.shape[0] == 0:
            break
        seen += images.shape[0]
        yield images.to(device), (None if labels is None else labels.to(device))
        if max_images is not None and seen >= max_images:
            break
    if seen == 0:
        raise ReproError("head selection got no images")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pooled_features(model: nn.Module, images: Tensor) -> Tensor:
    """The pre-logits vector of a timm ViT (cls token or pooled tokens, after the final norm)."""
    vit = unwrap_vit(model)
    return vit.forward_head(vit.forward_features(images), pre_logits=True)


# ----------------------------------------------------------------------------------------------------------
# losses for gradient importance

ImportanceLoss = Callable[[nn.Module, Tensor, Optional[Tensor]], Tensor]


def _need_labels(labels: Optional[Tensor], what: str) -> Tensor:
    if labels is None:
        raise ReproError(f"head importance with the {what} loss needs labelled images")
    return labels


def ce_loss(model: nn.Module, images: Tensor, labels: Optional[Tensor]) -> Tensor:
    vit = unwrap_vit(model)
    if getattr(vit, "num_classes", 0) <= 0:
        raise ReproError("the 'ce' head-importance loss needs a model with a classifier; "
                         "use loss='probe' (with a probe) or loss='feature' for an SSL model")
    logits = vit.forward_head(vit.forward_features(images))
    logits = logits[0] if isinstance(logits, tuple) else logits
    return F.cross_entropy(logits.float(), _need_labels(labels, "ce"))


def last_blocks_features(model: nn.Module, images: Tensor, n_last_blocks: int = 1, avgpool: bool = False) -> Tensor:
    """DINO's linear-evaluation input (``eval_linear.py``): the cls token of each of the last ``n_last_blocks``
    block outputs, each after the final norm, concatenated; with ``avgpool`` (DINO's ViT-B/16 setting, one block)
    the cls token and the mean patch token, interleaved as DINO's ``cat(..., -1).reshape`` leaves them."""
    vit = unwrap_vit(model)
    if getattr(vit, "cls_attn_blocks", None) is not None:
        # DINO's eval_linear.py reads intermediate blocks of ViTs only; other backbones (XCiT) feed the probe their
        # output, the normalised CLS token after the class-attention blocks.
        if n_last_blocks != 1 or avgpool:
            raise ReproError("a linear probe on an XCiT reads its output features (DINO eval_linear.py): "
                             "n_last_blocks 1, avgpool false")
        return pooled_features(model, images)
    if not 1 <= n_last_blocks <= len(vit.blocks):
        raise ReproError(f"n_last_blocks must lie in 1..{len(vit.blocks)}, got {n_last_blocks}")
    if avgpool and n_last_blocks != 1:
        raise ReproError("DINO's avgpool probe features use the last block only (n_last_blocks = 1)")
    outputs: list[Tensor] = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in vit.blocks[-n_last_blocks:]]
    try:
        vit.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    normed = [vit.norm(x) for x in outputs]
    features = torch.cat([x[:, 0] for x in normed], dim=-1)
    if avgpool:
        patches = normed[-1][:, vit.num_prefix_tokens:].mean(dim=1)
        features = torch.stack((features, patches), dim=-1).reshape(features.shape[0], -1)
    return features


class FeatureProbe(nn.Module):
    """A linear probe on :func:`last_blocks_features`; its settings are buffers, so they enter its fingerprint."""

    def __init__(self, linear: nn.Linear, n_last_blocks: int = 1, avgpool: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("n_last_blocks", torch.tensor(int(n_last_blocks)))
        self.register_buffer("avgpool", torch.tensor(bool(avgpool)))

    def forward(self, model: nn.Module, images: Tensor) -> Tensor:
        features = last_blocks_features(model, images, int(self.n_last_blocks), bool(self.avgpool))
        if features.shape[-1] != self.linear.in_features:
            raise ReproError(f"the probe expects {self.linear.in_features} input features, the model gives "
                             f"{features.shape[-1]} (n_last_blocks={int(self.n_last_blocks)}, "
                             f"avgpool={bool(self.avgpool)}); DINO uses 4 blocks for ViT-S/16, 1 + avgpool for ViT-B/16")
        return self.linear(features)


def load_linear_probe(path: str | os.PathLike, n_last_blocks: int = 1, avgpool: bool = False) -> FeatureProbe:
    """A published linear probe file (DINO's ``*_linearweights.pth``: ``{"state_dict": {"module.linear.weight",
    "module.linear.bias"}}``, or any file holding one 2-D weight and its bias) as a :class:`FeatureProbe`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ReproError(f"linear probe file not found: {file}")
    raw = unwrap_state_dict(read_checkpoint(file), file)
    weights = {k: v for k, v in raw.items() if k.endswith("weight") and v.ndim == 2}
    if len(weights) != 1:
        raise ReproError(f"linear probe {file} must hold exactly one 2-D weight, found {sorted(weights) or 'none'}")
    (name, weight), = weights.items()
    bias = raw.get(name[: -len("weight")] + "bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return FeatureProbe(linear, n_last_blocks, avgpool)


def probe_loss(probe: nn.Module) -> ImportanceLoss:
    """CE through ``probe``: a :class:`FeatureProbe` reads the model itself, any other module the pooled features."""
    def loss(model: nn.Module, images: Tensor, labels: Optional[Tensor]) -> Tensor:
        logits = probe(model, images) if isinstance(probe, FeatureProbe) else probe(pooled_features(model, images))
        return F.cross_entropy(logits.float(), _need_labels(labels, "probe"))

    return loss


def feature_loss(model: nn.Module, images: Tensor, labels: Optional[Tensor]) -> Tensor:
    """Label-free: cosine distance to the model's own features of the horizontally flipped images."""
    with torch.no_grad():
        target = pooled_features(model, torch.flip(images, dims=[3]))
    features = pooled_features(model, images)
    return (1.0 - F.cosine_similarity(features.float(), target.float(), dim=-1)).mean()


# ----------------------------------------------------------------------------------------------------------
# gradient importance (Michel et al. 2019)

@contextmanager
def head_mask(model: nn.Module, reading: Optional[str] = None) -> Iterator[Tensor]:
    """A ones [L, H] mask (requires_grad) multiplying each head's context before ``attn.proj``, over the layers
    of ``reading`` (default: the model's own; XCiT's XCA blocks for ``xca`` / ``xca_tokens``, its class-attention
    blocks for ``class_attention``). Every one of timm's attentions (``Attention``, ``XCA``, ``ClassAttn``) hands
    ``proj`` a [B, N, H * d] input whose channel ``h * d + c`` belongs to head ``h``."""
    attns = attention_modules(model, reading)
    heads = {a.num_heads for a in attns}
    if len(heads) != 1:
        raise ReproError(f"head masks need the same head count in every block, got {sorted(heads)}")
    mask = torch.ones(len(attns), heads.pop(), device=_device_of(model), requires_grad=True)

    def make_hook(layer: int, attn: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            context = args[0]
            batch, tokens, width = context.shape
            per_head = context.reshape(batch, tokens, attn.num_heads, width // attn.num_heads)
            scaled = per_head * mask[layer].to(context.dtype).view(1, 1, -1, 1)
            return (scaled.reshape(batch, tokens, width),) + tuple(args[1:])

        return hook

    handles = [a.proj.register_forward_pre_hook(make_hook(i, a)) for i, a in enumerate(attns)]
    try:
        yield mask
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def preserved_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Restore the python, numpy and torch (CPU and ``device``'s CUDA) RNG states on exit.

    Drawing augmented training batches for a selection moves the global RNGs (RandAugment, mixup); restoring
    them keeps a run's training identical whether its selection was computed or read from the cache."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (only the mask's), restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def gradient_head_importance(model: nn.Module, batches: Iterable[Any], loss: ImportanceLoss,
                             max_images: Optional[int] = None, normalize: bool = True,
                             importance_batch: Optional[int] = 1, reading: Optional[str] = None) -> Tensor:
    """``I[l, h] = mean over images of |dL/dxi[l, h]|`` -> [L, H], L2-normalised per layer when ``normalize``;
    the layers are those of ``reading`` (see :func:`head_mask`).

    Each gradient is that of the mean loss over ``importance_batch`` consecutive images (1: per example, Michel
    et al.'s definition; None: each incoming batch whole), weighted by its image count."""
    if importance_batch is not None and (isinstance(importance_batch, bool) or int(importance_batch) < 1):
        raise ReproError(f"importance_batch must be a positive integer or None, got {importance_batch!r}")
    device = _device_of(model)
    with _frozen_eval(model), head_mask(model, reading) as mask:
        importance = torch.zeros_like(mask, dtype=torch.float32)
        count = 0
        for images, labels in _iter_limited(batches, max_images, device):
            step = images.shape[0] if importance_batch is None else int(importance_batch)
            for start in range(0, images.shape[0], step):
                chunk = images[start:start + step]
                chunk_labels = None if labels is None else labels[start:start + step]
                (grad,) = torch.autograd.grad(loss(model, chunk, chunk_labels), mask)
                importance += grad.abs().float() * chunk.shape[0]
                count += chunk.shape[0]
        importance = importance / max(count, 1)
    if normalize:
        importance = importance / importance.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return importance.detach()


def attention_entropy(model: nn.Module, batches: Iterable[Any], max_images: Optional[int] = None,
                      reading: Optional[str] = None) -> Tensor:
    """Mean entropy (nats) of every head's attention rows -> [L, H] (the layers of ``reading``)."""
    device = _device_of(model)
    captures = [AttentionCapture(model, layer, drop_dist_token=False, reading=reading)
                for layer in range(depth(model, reading if reading is not None else "auto"))]
    total, count = None, 0
    try:
        with _frozen_eval(model), torch.no_grad():
            for images, _ in _iter_limited(batches, max_images, device):
                model(images)
                rows = []
                for capture in captures:
                    log_p = capture.pop()
                    rows.append(-(log_p.exp() * log_p).sum(dim=-1).mean(dim=-1).sum(dim=0))  # [H]
                batch_sum = torch.stack(rows)
                total = batch_sum if total is None else total + batch_sum
                count += images.shape[0]
    finally:
        for capture in captures:
            capture.remove()
    return total / count


def pick_heads(scores: Tensor, scope: str = "last", largest: bool = True, layer: int = -1) -> list[Pair]:
    """Argmax (or argmin) of [L, H] scores within the last layer, within ``layer`` (scope ``layer``), over all
    layers, or per layer."""
    if scope not in SCOPES:
        raise ReproError(f"unknown head-selection scope {scope!r}; known: {', '.join(SCOPES)}")
    signed = scores if largest else -scores
    if scope in ("last", "layer"):
        chosen = scores.shape[0] - 1 if scope == "last" else _layer_index(layer, scores.shape[0])
        return [(chosen, int(signed[chosen].argmax()))]
    if scope == "per_layer":
        return [(layer, int(signed[layer].argmax())) for layer in range(scores.shape[0])]
    flat = int(signed.flatten().argmax())
    return [divmod(flat, scores.shape[1])]


# ----------------------------------------------------------------------------------------------------------
# rules

SelectionRule = Callable[..., HeadSelection]
SELECTION_RULES: Registry[SelectionRule] = Registry("head-selection rule")
IMPORTANCE_LOSSES = ("ce", "probe", "feature")


def _layer_index(layer: int, count: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
        raise ReproError(f"layer {layer!r} is out of range for a ViT of depth {count}")
    return layer % count


def _resolve_layer(model: nn.Module, layer: int, reading: Optional[str] = None) -> int:
    return _layer_index(layer, depth(model, reading if reading is not None else "auto"))


def _scores_list(scores: Tensor) -> list[list[float]]:
    return [[round(float(v), 8) for v in row] for row in scores.cpu()]


def _importance_loss(loss: str, probe: Optional[nn.Module]) -> ImportanceLoss:
    if loss not in IMPORTANCE_LOSSES:
        raise ReproError(f"unknown head-importance loss {loss!r}; known: {', '.join(IMPORTANCE_LOSSES)}")
    if loss == "probe":
        if probe is None:
            raise ReproError("head-importance loss 'probe' needs probe=<a linear module on pooled features>")
        return probe_loss(probe)
    return ce_loss if loss == "ce" else feature_loss


def _heads_in(model: nn.Module, layer: int, reading: Optional[str]) -> int:
    return block_attention(model, layer, reading).num_heads


@SELECTION_RULES.register("importance")
def _rule_importance(model: nn.Module, batches: Optional[Iterable[Any]], scope: str = "last", loss: str = "ce",
                     probe: Optional[nn.Module] = None, max_images: Optional[int] = 2000, layer: int = -1,
                     importance_batch: Optional[int] = 1, reading: Optional[str] = None, **_: Any) -> HeadSelection:
    if batches is None:
        raise ReproError("head-selection rule 'importance' needs images")
    scores = gradient_head_importance(model, batches, _importance_loss(loss, probe), max_images,
                                      importance_batch=importance_batch, reading=reading)
    return HeadSelection("importance", pick_heads(scores, scope, layer=layer), _scores_list(scores))


@SELECTION_RULES.register("entropy")
def _rule_entropy(model: nn.Module, batches: Optional[Iterable[Any]], scope: str = "last",
                  prefer: str = "low", max_images: Optional[int] = 2000, layer: int = -1,
                  reading: Optional[str] = None, **_: Any) -> HeadSelection:
    if batches is None:
        raise ReproError("head-selection rule 'entropy' needs images")
    if prefer not in ("low", "high"):
        raise ReproError(f"entropy rule: prefer must be 'low' or 'high', got {prefer!r}")
    scores = attention_entropy(model, batches, max_images, reading)
    return HeadSelection("entropy", pick_heads(scores, scope, largest=prefer == "high", layer=layer),
                         _scores_list(scores))


@SELECTION_RULES.register("fixed")
def _rule_fixed(model: nn.Module, batches: Optional[Iterable[Any]], layer: int = -1, head: int = 0,
                reading: Optional[str] = None, **_: Any) -> HeadSelection:
    layer = _resolve_layer(model, layer, reading)
    heads = _heads_in(model, layer, reading)
    if not 0 <= head < heads:
        raise ReproError(f"head {head} is out of range for a block with {heads} heads")
    return HeadSelection("fixed", [(layer, int(head))])


@SELECTION_RULES.register("all")
def _rule_all(model: nn.Module, batches: Optional[Iterable[Any]], layer: int = -1, reading: Optional[str] = None,
              **_: Any) -> HeadSelection:
    layer = _resolve_layer(model, layer, reading)
    return HeadSelection("all", [(layer, h) for h in range(_heads_in(model, layer, reading))])


@SELECTION_RULES.register("random")
def _rule_random(model: nn.Module, batches: Optional[Iterable[Any]], layer: int = -1, seed: int = 0,
                 reading: Optional[str] = None, **_: Any) -> HeadSelection:
    layer = _resolve_layer(model, layer, reading)
    generator = torch.Generator().manual_seed(int(seed))
    head = int(torch.randint(_heads_in(model, layer, reading), (1,), generator=generator))
    return HeadSelection("random", [(layer, head)])


def select_heads(model: nn.Module, rule: str = "importance", batches: Optional[Iterable[Any]] = None,
                 **options: Any) -> HeadSelection:
    """Run one rule. Options: ``reading`` (which attention's heads, see ``repro.methods.attention_readings``; default the
    model's own), ``scope`` (last/layer/global/per_layer), ``loss`` (ce/probe/feature), ``probe``,
    ``importance_batch`` (importance: images per gradient, default 1), ``max_images`` (importance, entropy), ``prefer`` (entropy: low/high), ``layer`` (scope ``layer``; fixed,
    all, random), ``head`` (fixed), ``seed`` (random)."""
    selection = SELECTION_RULES.get(rule)(model, batches, **options)
    selection.config = {"rule": rule, **{k: v for k, v in options.items() if k != "probe"}}
    return selection


# ----------------------------------------------------------------------------------------------------------
# fingerprints and the cache

def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the parameter and buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(fingerprint: str, config: dict[str, Any]) -> str:
    text = json.dumps({"fingerprint": fingerprint, **config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _cache_config(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    config = {"rule": rule, **{k: v for k, v in options.items() if k != "probe"}}
    if rule == "importance":  # always in the key: selections from batch-level gradients must not be reused
        config.setdefault("importance_batch", 1)
    if options.get("probe") is not None:
        config["probe"] = model_fingerprint(options["probe"])
    return config


def selection_cache_path(cache_dir: str | os.PathLike, fingerprint: str, rule: str = "importance",
                         **options: Any) -> Path:
    """The JSON file in which :func:`select_heads_cached` keeps this (fingerprint, rule, options) selection."""
    config = _cache_config(rule, options)
    return Path(cache_dir) / f"heads-{rule}-{_cache_key(fingerprint, config)}.json"


def select_heads_cached(cache_dir: str | os.PathLike, model: nn.Module, rule: str = "importance",
                        batches: Optional[Iterable[Any]] = None, fingerprint: Optional[str] = None,
                        **options: Any) -> HeadSelection:
    """``select_heads`` with a JSON cache in ``cache_dir`` keyed by (fingerprint, rule, options).

    ``fingerprint`` defaults to :func:`model_fingerprint`; pass :func:`file_fingerprint` of the checkpoint to
    avoid hashing a large model's weights. A probe, when given, enters the key through its own fingerprint.
    """
    fingerprint = fingerprint or model_fingerprint(model)
    config = _cache_config(rule, options)
    path = selection_cache_path(cache_dir, fingerprint, rule, **options)
    if path.is_file():
        try:
            return HeadSelection.from_json(json.loads(path.read_text())["selection"])
        except (ValueError, KeyError, TypeError) as err:
            raise ReproError(f"head-selection cache file {path} is corrupt ({err}); delete it") from None
    selection = select_heads(model, rule, batches, **options)
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, "config": config,
                                        "selection": selection.to_json()}, indent=1, default=str))
    return selection
