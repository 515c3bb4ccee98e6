"""The one weights loader: pretrained weights, a checkpoint file, RepDistiller's format, a run's own weights.

Every model family and every caller (teachers, the runner, ``repro eval``) loads weights here, with one rule for
each step (``repro.core.io``: reading without unpickling code, unwrapping containers, THE prefix rule), then
``fit_state_dict``: one check of the weights against the model, and one ReproError naming the file for any
mismatch. Two modes, chosen by what the weights are for:

* ``strict=True`` (a teacher evaluated as it is, a run's own weights, timm CNN teachers): the file must be
  exactly the network: every weight present with its shape, no other weight (BatchNorm's ``num_batches_tracked``
  counters, absent from pre-0.4.1 files, are filled in: they do not affect inference).
* ``strict=False`` (``create_model(..., checkpoint=FILE)``: initialising a network from a published file): the
  classifier (``CLASSIFIER_PREFIXES``) is optional and is left at its initialisation, with a warning, when it is
  absent or of another class count, as fine-tuning scripts do; weights of other networks saved in the same file
  (a momentum encoder, a projection head, a distiller's teacher: top-level names the model does not have) are
  ignored; every other weight must be there with its shape, and a weight the model does not have under one of
  its own modules (``blocks.11.*`` for a 4-block ViT, ``layer1.2.*`` for a ResNet-18) is refused.

Pretrained weights are never fetched as a side effect: ``offline_requested`` (``HF_HUB_OFFLINE`` or
``REPRO_OFFLINE`` set) or an unreachable host (one bounded TCP probe, ``host_reachable``) means cache only, and a
file absent from the cache is one ReproError saying so (the one hub-offline check, for the Hugging Face hub and
torch.hub alike).
"""
from __future__ import annotations

import os
import re
import socket
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn
from torch import Tensor

from repro.core.io import (STATE_DICT_CONTAINERS, read_checkpoint, sha256_file, strip_prefixes,
                           unwrap_state_dict)
from repro.core.errors import ReproError

# RepDistiller/WTTM/mdistiller: torch.save({'model': state_dict, 'epoch': ...}), or a bare state dict.
REPDISTILLER_CONTAINERS: tuple[str, ...] = ("model",)
CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.", "classifier.", "head.", "head_dist.", "fc_norm.")
PROBE_TIMEOUT_S = 3.0
StateFilter = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


# ---------------------------------------------------------------------------------------- fitting a state dict


def _is_classifier(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str, *, strict: bool,
                   what: str = "the model") -> None:
    """Load ``state`` into ``model`` under the module doc's rules; ``source`` and ``what`` name both in errors."""
    own = model.state_dict()
    state = dict(state)
    if strict:
        for key, value in own.items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = value
    modules = {key.split(".", 1)[0] for key in own}
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    heads = [] if strict else [k for k in shapes if _is_classifier(k)]  # another class count: left as built
    # Not strict: a classifier the model does not have (DINO's projection head) and other networks saved in the
    # same file (top-level names the model does not have) are not this network's weights.
    unexpected = [k for k in state if k not in own and (strict or not (_is_classifier(k)
                                                                        or k.split(".", 1)[0] not in modules))]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and (strict or not _is_classifier(k))]
    problems = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in (
        ("weights missing", missing), ("weights the model does not have", unexpected),
        ("shape mismatches", [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                              for k in shapes if k not in heads])) if items]
    if problems:
        raise ReproError(f"{source} does not fit {what}: " + "; ".join(problems))
    loaded = {k: v for k, v in state.items() if k in own and k not in heads}
    model.load_state_dict(loaded, strict=strict)
    if any(_is_classifier(k) and k not in loaded for k in own):
        warnings.warn(f"{source}: classifier left at its initialisation (absent or of another class count)",
                      stacklevel=3)


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike[str], *, strict: bool = False,
                    checkpoint_key: Optional[str] = None, filter_fn: Optional[StateFilter] = None,
                    containers: tuple[str, ...] = STATE_DICT_CONTAINERS, what: str = "the model") -> None:
    """Load a checkpoint file into ``model``: read, unwrap, strip prefixes, convert (``filter_fn``: timm's
    layout conversions and position-embedding resampling), fit."""
    path = Path(checkpoint).expanduser()
    state = strip_prefixes(unwrap_state_dict(read_checkpoint(path), path, containers, checkpoint_key),
                           model.state_dict().keys())
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # timm's converters assume their own layouts
            raise ReproError(f"checkpoint {path} could not be converted for {what}: {type(err).__name__}: "
                             f"{err}") from None
    fit_state_dict(model, state, f"checkpoint {path}", strict=strict, what=what)


def check_weight_args(name: str, pretrained: bool, checkpoint: Optional[str | os.PathLike[str]]) -> None:
    """At most one weight source, and a checkpoint that exists: checked before a large model is built."""
    if pretrained and checkpoint:
        raise ReproError(f"{name}: give either pretrained=True or checkpoint=..., not both")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise ReproError(f"checkpoint file not found for {name}: {checkpoint}")


# ---------------------------------------------------------------------------- RepDistiller files, run weights


def read_repdistiller_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict of a RepDistiller checkpoint (``{'model': state_dict, ...}``) or of a bare state dict."""
    path = Path(path)
    return unwrap_state_dict(read_checkpoint(path), path, REPDISTILLER_CONTAINERS)


def load_repdistiller(arch: str, path: str | os.PathLike[str], num_classes: int = 100) -> nn.Module:
    """``create_model(arch)`` with a RepDistiller-format checkpoint loaded strictly, in eval mode."""
    from repro.models import create_model

    path = Path(path)
    if not path.is_file():
        raise ReproError(f"checkpoint file not found: {path}")
    model = create_model(arch, num_classes=num_classes)
    load_checkpoint(model, path, strict=True, containers=REPDISTILLER_CONTAINERS,
                    what=f"model {arch!r} (num_classes={num_classes})")
    return model.eval()


def load_run_weights(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """A run's own ``model.pt`` (a bare state dict of exactly this model) into ``model``; returns its sha256."""
    load_checkpoint(model, path, strict=True, containers=())
    return sha256_file(path)


# ------------------------------------------------------------------------------------------ pretrained weights


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` is this project's switch for runs without network; ``REPRO_OFFLINE`` says it for every hub."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "REPRO_OFFLINE"))


def host_reachable(host: str, port: int = 443, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect, name lookup included, bounded by ``timeout_s`` (a lookup alone can hang far longer)."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def _offline_because(host: str) -> Optional[str]:
    """Why downloads are off (the one offline check), or None when the host may be asked."""
    if offline_requested():
        return "offline mode is set (HF_HUB_OFFLINE/REPRO_OFFLINE)"
    if not host_reachable(host):
        return f"{host} is unreachable"
    return None


@contextmanager
def _hub_cache_only(offline: bool) -> Iterator[None]:
    """Force huggingface_hub's offline mode (cache only, no retries) for the duration of one load.

    huggingface_hub reads ``constants.HF_HUB_OFFLINE`` at call time but the environment variable only at
    import, so setting the constant is the way to honour an ``HF_HUB_OFFLINE`` set after import.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def timm_pretrained(timm_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(timm_name, pretrained=True)``, from the Hugging Face cache when downloads are off."""
    import timm
    from huggingface_hub import constants

    why = _offline_because(urlparse(constants.ENDPOINT).hostname or "huggingface.co")
    try:
        with _hub_cache_only(why is not None):
            return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # hub, network and cache errors all mean the same thing to the user
        where = f"{why}, and " if why else ""
        raise ReproError(
            f"pretrained weights for {timm_name!r} could not be loaded ({where}they are not in the local "
            f"cache): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
            f"pass checkpoint=<local file> instead") from None


def cached_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (or would keep) the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _check_hash_prefix(path: Path) -> None:
    """torchvision file names end in the first hex digits of the file's sha256 (``resnet18-f37072fd.pth``)."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if match and not sha256_file(path).startswith(match.group(1)):
        raise ReproError(f"cached weights {path} are corrupt (sha256 does not start with {match.group(1)}); "
                         f"delete the file and fetch it again")


def torchvision_state_dict(weights: Any) -> dict[str, Tensor]:
    """The state dict of torchvision ``weights`` (a ``WeightsEnum``) from the torch.hub cache, downloading only
    when downloads are on."""
    url = weights.url
    path = cached_hub_file(url)
    if not path.is_file():
        why = _offline_because(urlparse(url).hostname or "download.pytorch.org")
        if why:
            raise ReproError(f"pretrained weights {weights} are not in the local cache ({path}) and {why}; "
                             f"put the file there (from {url}) or pass checkpoint=<local file>")
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
        except Exception as err:  # network, disk and hash errors all mean "no weights" to the user
            raise ReproError(f"downloading {url} failed: {type(err).__name__}: {err}") from None
    _check_hash_prefix(path)
    return unwrap_state_dict(read_checkpoint(path), path)
