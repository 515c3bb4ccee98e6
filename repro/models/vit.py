"""Vision transformers from timm (SSTA's students, teachers and teaching assistants) and tiny smoke ViTs.

Every model is a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) inside :class:`TimmViT`, which
speaks the ``repro.models`` feature contract. Attention-level terms never go through the wrapper's forward:
they hook the timm blocks directly (``TimmViT.vit.blocks[l].attn.qkv``), so timm's fused attention stays on.

Weights (``repro.models.weights``): nothing is ever fetched unless ``pretrained=True``, and then only when the hub
is reachable (or the weights are already in the local Hugging Face cache); ``checkpoint=<local file>`` is the
offline path (ssta.md 6: this workplace cannot download weights), through timm's ``checkpoint_filter_fn`` (old
layouts, position-embedding resampling).

Distilled DeiT students (cls + dist token) follow timm's own ``distilled_training`` switch, with one
simplification: the wrapper always returns ONE logits tensor.
* default (``distilled_training`` off): the average of the cls and dist heads, in training and at eval, so a
  plain CE run trains exactly what is evaluated (timm's behaviour);
* ``set_distilled_training(True)`` (done by the ``deit_hard`` term): training returns the cls-head logits (for
  CE) and the dist-head logits reach the term through a forward hook on ``vit.head_dist``; eval still
  averages the two heads, as DeiT reports (ssta.md 3.1, 8.10).
"""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from repro.core.errors import ReproError
from repro.models import register_model
from repro.models.weights import check_weight_args, load_checkpoint, timm_pretrained


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
# factories

def build_timm_vit(timm_name: str, num_classes: int, pretrained: bool = False, checkpoint: Optional[str] = None,
                   checkpoint_key: Optional[str] = None, drop_path_rate: float = 0.0,
                   img_size: Optional[int] = None, **timm_kwargs: Any) -> TimmViT:
    """Any timm ViT by name (``deit_tiny_patch16_224``, ``vit_small_patch16_224.dino``, ...), wrapped."""
    check_weight_args(timm_name, pretrained, checkpoint)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        vit = timm_pretrained(timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
    except RuntimeError as err:  # timm's "Unknown model" and bad-argument errors
        raise ReproError(f"timm could not build {timm_name!r}: {err}") from None
    if not isinstance(vit, VisionTransformer):
        xcit = timm_name.startswith("xcit")
        hint = " (XCiT models are registered by name: xcit_tiny_12_p16_224, ...)" if xcit else ""
        raise ReproError(f"{timm_name!r} is a {type(vit).__name__}, not a timm VisionTransformer; "
                         f"the ViT family supports only VisionTransformer models{hint}")
    if checkpoint:
        load_checkpoint(vit, checkpoint, checkpoint_key=checkpoint_key, filter_fn=checkpoint_filter_fn)
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
        load_checkpoint(vit, checkpoint, checkpoint_key=checkpoint_key, filter_fn=checkpoint_filter_fn)
    return TimmViT(vit)


def _smoke_factory(arch: dict[str, int], distilled: bool):
    def factory(num_classes: int = 10, **kwargs: Any) -> TimmViT:
        return build_smoke_vit(arch, num_classes, distilled=distilled, **kwargs)

    return factory


for _name, _arch in _SMOKE_ARCHS.items():
    register_model(_name)(_smoke_factory(_arch, distilled=False))
    register_model(f"{_name}_distilled")(_smoke_factory(_arch, distilled=True))
