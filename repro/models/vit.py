"""Vision transformers from timm (SSTA's students, teachers and teaching assistants) and tiny smoke ViTs.

Every model is a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) inside :class:`TimmViT`, which
speaks the ``repro.models`` feature contract. Attention-level terms never go through the wrapper's forward:
they hook the timm blocks directly (``TimmViT.vit.blocks[l].attn.qkv``), so timm's fused attention stays on.

Weights: nothing is ever fetched unless ``pretrained=True``, and then only when the hub is reachable (or the
weights are already in the local Hugging Face cache); ``checkpoint=<local file>`` is the offline path
(ssta.md 6: this workplace cannot download weights).

Distilled DeiT students (cls + dist token) follow timm's own ``distilled_training`` switch, with one
simplification: the wrapper always returns ONE logits tensor.
* default (``distilled_training`` off): the average of the cls and dist heads, in training and at eval, so a
  plain CE run trains exactly what is evaluated (timm's behaviour);
* ``set_distilled_training(True)`` (done by the ``deit_hard`` term): training returns the cls-head logits (for
  CE) and the dist-head logits reach the term through a forward hook on ``vit.head_dist``; eval still
  averages the two heads, as DeiT reports (ssta.md 3.1, 8.10).
"""
from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from repro.errors import ReproError
from repro.models import register_model

# Prefixes that wrappers (DDP, EMA, SSL frameworks, this wrapper) put in front of the ViT's own keys.
_KEY_PREFIXES = ("module.", "model.", "vit.", "backbone.", "base_encoder.", "encoder.")
# Containers in which training scripts nest the state dict; DINO's full checkpoints hold a student and a
# teacher, and DINO evaluates the teacher, so "teacher" is searched before "student".
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "student", "module")


class TimmViT(nn.Module):
    """A timm ViT under the repro feature contract.

    ``model(x)`` returns logits; ``model(x, is_feat=True)`` returns ``([block_1, ..., block_{L-1}, tokens,
    pooled], logits)`` where ``block_i`` is the output token map [B, N, C] of block i (prefix tokens included),
    ``tokens`` the final normalised token map (the last block's output after the final norm) and ``pooled`` the
    pre-logits vector [B, C]: ``feats[-1]`` and ``feats[-2]`` are the same at any depth (``preact`` has no
    meaning for a transformer and is ignored). Block outputs are read by forward hooks, so the forward is
    timm's own.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def no_weight_decay(self) -> set[str]:
        """DeiT exempts position embedding and class/dist tokens from weight decay (timm's list, our prefix)."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def is_distilled(self) -> bool:
        return isinstance(self.vit, VisionTransformerDistilled)

    @property
    def dist_head(self) -> nn.Module:
        """The classifier whose training output is the distillation logits (DeiT: the dist token's head)."""
        if not self.is_distilled:
            raise ReproError("a dist head needs a distilled ViT (one with a dist token)")
        return self.vit.head_dist

    def set_distilled_training(self, enable: bool = True) -> None:
        if not self.is_distilled:
            raise ReproError("set_distilled_training needs a distilled ViT (one with a dist token)")
        self.vit.set_distilled_training(enable)

    def _head(self, tokens: Tensor) -> Tensor:
        logits = self.vit.forward_head(tokens)
        # timm returns (cls, dist) only in distilled training; the dist logits are read by a hook instead.
        return logits[0] if isinstance(logits, tuple) else logits

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False
                ) -> Tensor | tuple[list[Tensor], Tensor]:
        if not is_feat:
            return self._head(self.vit.forward_features(x))
        blocks: list[Tensor] = []
        hooks = [block.register_forward_hook(lambda _m, _i, output: blocks.append(output))
                 for block in self.vit.blocks[:-1]]
        try:
            tokens = self.vit.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        logits = self._head(tokens)
        pooled = self.vit.forward_head(tokens, pre_logits=True)
        return [*blocks, tokens, pooled], logits

    @property
    def num_prefix_tokens(self) -> int:
        """Class (and dist / register) tokens in front of the patch tokens of every token map."""
        return int(self.vit.num_prefix_tokens)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)


# ----------------------------------------------------------------------------------------------------------
# weights

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect to the hub; huggingface_hub itself retries for about a minute when offline."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
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


def _create_pretrained(timm_name: str, **kwargs: Any) -> VisionTransformer:
    offline = _env_true("HF_HUB_OFFLINE") or not _hub_reachable()
    try:
        with _hub_offline(offline):
            return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as err:  # hub, network and cache errors all mean the same thing to the user
        where = "the hub is unreachable or HF_HUB_OFFLINE is set, and " if offline else ""
        raise ReproError(
            f"pretrained weights for {timm_name!r} could not be loaded ({where}they are not in the local "
            f"cache): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
            f"pass checkpoint=<local file> instead") from None


def _read_checkpoint_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    # DeiT/MoCo checkpoints pickle argparse objects next to the weights; the user named this local file.
    return torch.load(path, map_location="cpu", weights_only=False)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap_state_dict(obj: Any, path: Path, checkpoint_key: Optional[str]) -> dict[str, Tensor]:
    if checkpoint_key is not None:
        if not isinstance(obj, dict) or checkpoint_key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ReproError(f"checkpoint {path} has no key {checkpoint_key!r}; it has: {keys}")
        obj = obj[checkpoint_key]
    for _ in range(4):  # containers nest at most a few levels deep
        if _is_state_dict(obj):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ReproError(f"checkpoint {path} holds no state dict of tensors (top-level keys: {keys}); "
                         f"name the right entry with checkpoint_key=")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if any(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _is_classifier_key(key: str) -> bool:
    return key.startswith(("head.", "head_dist.", "fc_norm."))


def load_vit_checkpoint(vit: nn.Module, checkpoint: str | os.PathLike, checkpoint_key: Optional[str] = None,
                        filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] = checkpoint_filter_fn
                        ) -> None:
    """Load a local checkpoint into a timm ViT (or XCiT, with its ``filter_fn``), with one clear ReproError for
    any mismatch.

    Classifier weights are optional (SSL checkpoints have none) and are dropped when their shape differs
    (a 1000-class checkpoint into a 100-class model), as fine-tuning scripts do; every other model key must
    be present with the right shape. Extra keys (projection heads, momentum encoders) are ignored.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ReproError(f"checkpoint file not found: {path}")
    try:
        raw = _read_checkpoint_file(path)
    except Exception as err:
        raise ReproError(f"checkpoint {path} could not be read: {type(err).__name__}: {err}") from None
    state_dict = _strip_prefixes(_unwrap_state_dict(raw, path, checkpoint_key))
    # timm's filter converts old layouts and resamples the position embedding to the model's grid.
    state_dict = filter_fn(state_dict, vit)
    own = vit.state_dict()
    wrong_shape = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    dropped_heads = [k for k in wrong_shape if _is_classifier_key(k)]
    wrong_shape = [k for k in wrong_shape if k not in dropped_heads]
    if wrong_shape:
        details = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:5])
        raise ReproError(f"checkpoint {path} does not fit the model ({len(wrong_shape)} shape mismatches: {details})")
    state_dict = {k: v for k, v in state_dict.items() if k in own and k not in dropped_heads}
    missing = [k for k in own if k not in state_dict and not _is_classifier_key(k)]
    if missing:
        raise ReproError(f"checkpoint {path} does not fit the model: {len(missing)} weights missing, "
                         f"e.g. {missing[:5]}")
    vit.load_state_dict(state_dict, strict=False)
    if dropped_heads or any(_is_classifier_key(k) and k not in state_dict for k in own):
        warnings.warn(f"checkpoint {path}: classifier left at its initialisation "
                      f"(absent or of another class count)", stacklevel=2)


# ----------------------------------------------------------------------------------------------------------
# factories

def build_timm_vit(timm_name: str, num_classes: int, pretrained: bool = False, checkpoint: Optional[str] = None,
                   checkpoint_key: Optional[str] = None, drop_path_rate: float = 0.0,
                   img_size: Optional[int] = None, **timm_kwargs: Any) -> TimmViT:
    """Any timm ViT by name (``deit_tiny_patch16_224``, ``vit_small_patch16_224.dino``, ...), wrapped."""
    if pretrained and checkpoint:
        raise ReproError(f"{timm_name}: give either pretrained=True or checkpoint=..., not both")
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint and not Path(checkpoint).expanduser().is_file():  # fail before building a large model
        raise ReproError(f"checkpoint file not found for {timm_name}: {checkpoint}")
    try:
        vit = _create_pretrained(timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model" and bad-argument errors
        raise ReproError(f"timm could not build {timm_name!r}: {err}") from None
    if not isinstance(vit, VisionTransformer):
        xcit = timm_name.startswith("xcit")
        hint = " (XCiT models are registered by name: xcit_tiny_12_p16_224, ...)" if xcit else ""
        raise ReproError(f"{timm_name!r} is a {type(vit).__name__}, not a timm VisionTransformer; "
                         f"the ViT family supports only VisionTransformer models{hint}")
    if checkpoint:
        load_vit_checkpoint(vit, checkpoint, checkpoint_key)
    return TimmViT(vit)


@register_model("timm_vit")
def timm_vit(num_classes: int = 1000, timm_name: str = "", **kwargs: Any) -> TimmViT:
    """Generic path: ``create_model("timm_vit", num_classes=..., timm_name="<any timm ViT name>")``."""
    if not timm_name:
        raise ReproError("model 'timm_vit' needs timm_name=<a timm model name>")
    return build_timm_vit(timm_name, num_classes, **kwargs)


# Named entries: students (ssta.md 2.4), supervised teachers and SSL teaching assistants.
_NAMED_VITS = (
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "vit_small_patch16_224", "vit_base_patch16_224",
    "vit_small_patch16_224.dino", "vit_base_patch16_224.dino", "vit_base_patch16_224.mae",
)


def _named_factory(timm_name: str):
    def factory(num_classes: int = 1000, **kwargs: Any) -> TimmViT:
        return build_timm_vit(timm_name, num_classes, **kwargs)

    factory.__name__ = timm_name
    return factory


for _name in _NAMED_VITS:
    register_model(_name)(_named_factory(_name))


# ----------------------------------------------------------------------------------------------------------
# smoke-tier ViTs: real timm classes (so the attention code path is timm's), 32-pixel inputs, patch 4

_SMOKE_ARCHS = {
    "vit_smoke_tiny": dict(embed_dim=96, depth=4, num_heads=3),
    "vit_smoke_small": dict(embed_dim=192, depth=4, num_heads=6),
}


def build_smoke_vit(arch: dict[str, int], num_classes: int, distilled: bool = False, img_size: int = 32,
                    patch_size: int = 4, drop_path_rate: float = 0.0, checkpoint: Optional[str] = None,
                    checkpoint_key: Optional[str] = None, pretrained: bool = False) -> TimmViT:
    if pretrained:
        raise ReproError("smoke ViTs have no pretrained weights; pass checkpoint=<local file>")
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    vit = cls(img_size=img_size, patch_size=patch_size, num_classes=num_classes, mlp_ratio=4.0, qkv_bias=True,
              drop_path_rate=drop_path_rate, **arch)
    if checkpoint:
        load_vit_checkpoint(vit, checkpoint, checkpoint_key)
    return TimmViT(vit)


def _smoke_factory(arch: dict[str, int], distilled: bool):
    def factory(num_classes: int = 10, **kwargs: Any) -> TimmViT:
        return build_smoke_vit(arch, num_classes, distilled=distilled, **kwargs)

    return factory


for _name, _arch in _SMOKE_ARCHS.items():
    register_model(_name)(_smoke_factory(_arch, distilled=False))
    register_model(f"{_name}_distilled")(_smoke_factory(_arch, distilled=True))
