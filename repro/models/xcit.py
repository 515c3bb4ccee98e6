"""XCiT (El-Nouby et al. 2021) from timm: SSTA's second student family (ssta.md 2.4, 3.2, 8.3) and tiny smoke XCiTs.

Every model is timm's own ``Xcit`` class inside :class:`TimmXCiT`, which speaks the same feature contract as
:class:`repro.models.vit.TimmViT` (``vit`` attribute, ``blocks``, ``forward(x, is_feat)``), so the attention terms
hook the real XCA blocks (``vit.blocks[l].attn``) and class-attention blocks (``vit.cls_attn_blocks[l].attn``) and
timm's fused attention stays on.

Distilled XCiT follows facebookresearch/xcit ``xcit.py``: there is no dist token; in training ``forward`` returns
``(x, x)``, the same classifier output twice, so DeiT's ``DistillationLoss`` applies CE and the hard KD to the same
logits. Here the wrapper returns one logits tensor and :attr:`TimmXCiT.dist_head` is that same ``head``, so the
``deit_hard`` term reads the very logits CE reads (``(1 - alpha) CE(x) + alpha CE(x, argmax teacher)``, as xcit's
``losses.py`` computes with ``outputs == outputs_kd``); at test time there is one head (no cls/dist average).

Names: ``xcit_{tiny_12,small_12,medium_24}_p16_224`` (``pretrained``: timm's ``.fb_in1k``),
``..._distilled`` (``.fb_dist_in1k``), and DINO's self-supervised XCiTs ``dino_xcit_{small_12,medium_24}_p16``
(no timm weights: ``checkpoint=dino_xcit_small_12_p16_pretrain.pth``, a backbone without classifier). Weights
load exactly as the ViT family's (``pretrained`` fails fast offline; ``checkpoint`` is any local file, official or
timm layout, through timm's XCiT ``checkpoint_filter_fn``).
"""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models.xcit import Xcit
from timm.models.xcit import checkpoint_filter_fn as xcit_filter_fn

from repro.core.errors import ReproError
from repro.models import register_model
from repro.models.vit import TimmViT
from repro.models.weights import check_weight_args, load_checkpoint, timm_pretrained


class TimmXCiT(TimmViT):
    """A timm ``Xcit`` under the repro feature contract; ``distilled`` marks a student trained with DeiT's hard KD
    on its one head (xcit's convention), which changes nothing in the network itself."""

    def __init__(self, xcit: Xcit, distilled: bool = False) -> None:
        super().__init__(xcit)  # type: ignore[arg-type]  # TimmViT only stores it as .vit
        self.distilled = bool(distilled)

    def no_weight_decay(self) -> set[str]:
        # facebookresearch/xcit trains with timm 0.4.8's create_optimizer, which skips 1-d parameters and the
        # exact names of xcit.py's no_weight_decay() {'pos_embed', 'cls_token', 'dist_token'}; of these only
        # cls_token names a parameter (the Fourier encoder is 'pos_embeder.*'), so only it is exempt here.
        return {"vit.cls_token"}

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def is_distilled(self) -> bool:
        return self.distilled

    @property
    def shared_dist_head(self) -> bool:
        """True: the cls and dist outputs are one head (xcit.py returns ``(x, x)`` in training)."""
        return True

    @property
    def dist_head(self) -> nn.Module:
        if not self.distilled:
            raise ReproError("a dist head needs a distilled XCiT student (an ..._distilled model)")
        return self.vit.head

    def set_distilled_training(self, enable: bool = True) -> None:
        if not self.distilled:
            raise ReproError("set_distilled_training needs a distilled XCiT student (an ..._distilled model)")
        # Nothing to switch: training and test forwards both give the one head's logits.


def build_timm_xcit(timm_name: str, num_classes: int, pretrained: bool = False, checkpoint: Optional[str] = None,
                    checkpoint_key: Optional[str] = None, drop_path_rate: float = 0.0, distilled: bool = False,
                    img_size: Optional[int] = None, **timm_kwargs: Any) -> TimmXCiT:
    """A timm XCiT by name (``xcit_tiny_12_p16_224``, ``xcit_small_12_p16_224.fb_dist_in1k``, ...), wrapped."""
    check_weight_args(timm_name, pretrained, checkpoint)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm_pretrained(timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
    except RuntimeError as err:
        raise ReproError(f"timm could not build {timm_name!r}: {err}") from None
    if not isinstance(model, Xcit):
        raise ReproError(f"{timm_name!r} is a {type(model).__name__}, not a timm Xcit")
    if checkpoint:
        load_checkpoint(model, checkpoint, checkpoint_key=checkpoint_key, filter_fn=xcit_filter_fn)
    return TimmXCiT(model, distilled)


# name -> (timm architecture, timm pretrained tag or None, distilled); ssta.md 2.4
_NAMED_XCITS: dict[str, tuple[str, Optional[str], bool]] = {}
for _arch in ("xcit_tiny_12_p16_224", "xcit_small_12_p16_224", "xcit_medium_24_p16_224"):
    _NAMED_XCITS[_arch] = (_arch, "fb_in1k", False)
    _NAMED_XCITS[f"{_arch}_distilled"] = (_arch, "fb_dist_in1k", True)
# DINO's XCiT backbones (facebookresearch/xcit README "XCiT + DINO"; dino hubconf dino_xcit_*): no timm weights.
_DINO_FILES = {"dino_xcit_small_12_p16": ("xcit_small_12_p16_224", "dino_xcit_small_12_p16_pretrain.pth"),
               "dino_xcit_medium_24_p16": ("xcit_medium_24_p16_224", "dino_xcit_medium_24_p16_pretrain.pth")}


def _named_factory(name: str, arch: str, tag: Optional[str], distilled: bool):
    def factory(num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> TimmXCiT:
        timm_name = f"{arch}.{tag}" if pretrained and tag else arch
        return build_timm_xcit(timm_name, num_classes, pretrained=pretrained, distilled=distilled, **kwargs)

    factory.__name__ = name
    return factory


def _dino_factory(name: str, arch: str, filename: str):
    def factory(num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> TimmXCiT:
        if pretrained:
            raise ReproError(f"{name}: DINO's XCiT weights are not in timm; download {filename} "
                             f"(https://dl.fbaipublicfiles.com/dino/{name}_pretrain/{filename}) and give the "
                             f"model checkpoint=<that file> (in the spec: models.{name}.checkpoint)")
        return build_timm_xcit(arch, num_classes, **kwargs)

    factory.__name__ = name
    return factory


for _name, (_arch, _tag, _distilled) in _NAMED_XCITS.items():
    register_model(_name)(_named_factory(_name, _arch, _tag, _distilled))
for _name, (_arch, _file) in _DINO_FILES.items():
    register_model(_name)(_dino_factory(_name, _arch, _file))


# ----------------------------------------------------------------------------------------------------------
# smoke-tier XCiTs: timm's Xcit class (real XCA, LPI and class attention), 32-pixel inputs, patch 8 (16 tokens).
# Tiny and small share the head dimension (16), as XCiT-T12 and XCiT-S12 do (48), so the XCA channel-map reading
# is shape-compatible between them, as at the full tier.

_SMOKE_ARCHS = {
    "xcit_smoke_tiny": dict(embed_dim=64, depth=2, num_heads=4),
    "xcit_smoke_small": dict(embed_dim=128, depth=2, num_heads=8),
}


def build_smoke_xcit(arch: dict[str, int], num_classes: int, distilled: bool = False, img_size: int = 32,
                     patch_size: int = 8, drop_path_rate: float = 0.0, checkpoint: Optional[str] = None,
                     checkpoint_key: Optional[str] = None, pretrained: bool = False) -> TimmXCiT:
    if pretrained:
        raise ReproError("smoke XCiTs have no pretrained weights; pass checkpoint=<local file>")
    model = Xcit(img_size=img_size, patch_size=patch_size, num_classes=num_classes, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=drop_path_rate, eta=1.0, tokens_norm=True, **arch)
    if checkpoint:
        load_checkpoint(model, checkpoint, checkpoint_key=checkpoint_key, filter_fn=xcit_filter_fn)
    return TimmXCiT(model, distilled)


def _smoke_factory(arch: dict[str, int], distilled: bool):
    def factory(num_classes: int = 10, **kwargs: Any) -> TimmXCiT:
        return build_smoke_xcit(arch, num_classes, distilled=distilled, **kwargs)

    return factory


for _name, _arch_args in _SMOKE_ARCHS.items():
    register_model(_name)(_smoke_factory(_arch_args, distilled=False))
    register_model(f"{_name}_distilled")(_smoke_factory(_arch_args, distilled=True))
