"""Per-head attention maps of timm ViTs, captured without turning timm's fused attention off.

timm's ``Attention`` uses ``F.scaled_dot_product_attention`` and never materialises the attention weights
(ssta.md 8.6). A forward hook on ``blocks[l].attn.qkv`` sees the fused q/k/v projection; from it we recompute
``log softmax(q_h k_h^T * scale / tau)`` for the requested heads only, in float32, from the pre-softmax scores
(never the log of probabilities). The hook output stays in the autograd graph, so a student's maps carry
gradients back to its ``qkv`` weights; teacher/TA captures are simply run under ``torch.no_grad()``.

Student head mappings (ssta.md 2.3.2, all [INFERRED], the paper's choice is unknown):
* ``heads`` (the term's ``split``): one map per requested head;
* ``relation``: one map from the concatenated q and k of all heads, ``softmax(Q_cat K_cat^T / sqrt(C))``
  (MiniLMv2-style relation with a single relation head);
* ``mean``: ``log`` of the mean of the requested heads' probability maps.

Readings (``READINGS``, the ``reading`` option): which attention of a model is "the attention distribution".
* ``token`` (ViT/DeiT): ``softmax(q k^T * scale)`` over tokens in ``blocks[l].attn``, [B, h, N, N];
* ``xca`` (XCiT, ssta.md 8.3 (i)): the cross-covariance channel map of ``blocks[l].attn`` (an ``XCA``), exactly
  as timm computes it: q and k L2-normalised over the tokens, ``softmax(q_hat k_hat^T * temperature_h)`` over
  channels, [B, h, d_h, d_h] (comparable only between models of equal head dimension);
* ``class_attention`` (XCiT, 8.3 (ii)): the CLS -> token distribution of class-attention block
  ``cls_attn_blocks[l].attn`` (timm's ``ClassAttn``), ``softmax(q_cls k^T * d_h^-1/2)``, [B, h, 1, 1 + P];
* ``xca_tokens`` (XCiT, 8.3 (iii)): a token map from an XCA block's raw q and k, ``softmax(q k^T / sqrt(d_h))``
  over the P patch tokens, [B, h, P, P] (XCiT itself never forms it).
Layers are indexed within a reading's own modules (``class_attention``: the two class-attention blocks).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import Attention
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from repro.core.errors import ReproError
from repro.core.registry import Registry

CAPTURE_MODES = ("heads", "relation", "mean")
# q and k of every head ([B, H, Nq, d] and [B, H, Nk, d]) and the score scale: a float, or [H, 1, 1] per head.
QKCallback = Callable[[Tensor, Tensor, Union[float, Tensor]], None]
Wanted = Callable[[], bool]  # whether the capture records now: hooks return at once otherwise (no wasted work)


def unwrap_vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer (or Xcit) inside ``model`` (a repro wrapper or a bare timm model)."""
    vit = getattr(model, "vit", model)
    if not isinstance(getattr(vit, "blocks", None), (nn.Sequential, nn.ModuleList)):
        raise ReproError(f"{type(model).__name__} is not a timm ViT (no .blocks); attention terms need one")
    return vit


def _split_heads(projected: Tensor, heads: int) -> Tensor:
    """[B, N, H * d] -> [B, H, N, d]."""
    batch, tokens, width = projected.shape
    return projected.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


class Reading:
    """One way of reading per-head attention maps out of a model (see the module docstring)."""

    name = ""
    module_type: type = nn.Module
    supports_relation = True

    def modules(self, vit: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def applies(self, vit: nn.Module) -> bool:
        modules = self._raw_modules(vit)
        return bool(modules) and all(isinstance(m, self.module_type) for m in modules)

    def _raw_modules(self, vit: nn.Module) -> list[nn.Module]:
        return [getattr(block, "attn", None) for block in getattr(vit, "blocks", [])]

    def install(self, attn: nn.Module, on_qk: QKCallback, wanted: Wanted) -> list[RemovableHandle]:
        raise NotImplementedError


READINGS: Registry[Reading] = Registry("attention reading")


class _BlockReading(Reading):
    def modules(self, vit: nn.Module) -> list[nn.Module]:
        return self._raw_modules(vit)


class TokenReading(_BlockReading):
    """timm ``Attention``: hook on the fused qkv projection (per-head q/k norms applied as timm does)."""

    name = "token"
    module_type = Attention

    def install(self, attn: nn.Module, on_qk: QKCallback, wanted: Wanted) -> list[RemovableHandle]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
            if not wanted():
                return
            batch, tokens, _ = out.shape
            qkv = out.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            on_qk(attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), attn.scale)

        return [attn.qkv.register_forward_hook(hook)]


def _xca_type() -> type:
    from timm.models.xcit import XCA

    return XCA


def _xca_q_k(qkv_out: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """q and k, each [B, H, N, d_h], from the output [B, N, 3 C] of an XCA block's ``qkv`` linear."""
    batch, tokens, width = qkv_out.shape
    qkv = qkv_out.reshape(batch, tokens, 3, num_heads, width // 3 // num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


class _XCABlockReading(_BlockReading):
    """A reading of timm's ``XCA`` blocks: one hook on ``qkv`` hands q, k and a scale to the capture."""

    @property
    def module_type(self) -> type:  # type: ignore[override]
        return _xca_type()

    def install(self, attn: nn.Module, on_qk: QKCallback, wanted: Wanted) -> list[RemovableHandle]:
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
            if wanted():
                q, k = _xca_q_k(out, attn.num_heads)  # [B, H, N, d]
                on_qk(*self.read(q, k, attn))

        return [attn.qkv.register_forward_hook(hook)]

    def read(self, q: Tensor, k: Tensor, attn: nn.Module) -> tuple[Tensor, Tensor, Any]:  # pragma: no cover
        raise NotImplementedError


class XCAReading(_XCABlockReading):
    """timm ``XCA``: channel maps ``softmax(normalize(q) normalize(k)^T * temperature)``, [B, H, d, d]."""

    name = "xca"
    supports_relation = False  # concatenating heads would give a C x C map, no teacher has one

    def read(self, q: Tensor, k: Tensor, attn: nn.Module) -> tuple[Tensor, Tensor, Any]:
        # (B, H, d, N), as timm's XCA.forward permutes them, L2-normalised over the tokens
        q = torch.nn.functional.normalize(q.transpose(-2, -1).float(), dim=-1)
        k = torch.nn.functional.normalize(k.transpose(-2, -1).float(), dim=-1)
        return q, k, attn.temperature


class XCATokenReading(_XCABlockReading):
    """A token map from an XCA block's raw q and k: ``softmax(q k^T / sqrt(d_h))`` over the patch tokens."""

    name = "xca_tokens"

    def read(self, q: Tensor, k: Tensor, attn: nn.Module) -> tuple[Tensor, Tensor, Any]:
        return q, k, q.shape[-1] ** -0.5


class ClassAttentionReading(Reading):
    """timm ``ClassAttn`` (XCiT's two class-attention blocks): the CLS query against all tokens, [B, H, 1, N].

    ``ClassAttn.forward`` computes ``q(x[:, 0])`` before ``k(x)``: a hook on ``q`` keeps the query, the one on
    ``k`` forms the map."""

    name = "class_attention"

    @property
    def module_type(self) -> type:  # type: ignore[override]
        from timm.models.cait import ClassAttn

        return ClassAttn

    def _raw_modules(self, vit: nn.Module) -> list[nn.Module]:
        return [getattr(block, "attn", None) for block in (getattr(vit, "cls_attn_blocks", None) or [])]

    def modules(self, vit: nn.Module) -> list[nn.Module]:
        return self._raw_modules(vit)

    def install(self, attn: nn.Module, on_qk: QKCallback, wanted: Wanted) -> list[RemovableHandle]:
        query: list[Tensor] = []

        def keep_query(module: nn.Module, inputs: Any, out: Tensor) -> None:
            query[:] = [out] if wanted() else []

        def hook(module: nn.Module, inputs: Any, out: Tensor) -> None:
            if not query:
                return
            q = _split_heads(query.pop().unsqueeze(1), attn.num_heads)  # [B, H, 1, d]
            on_qk(q, _split_heads(out, attn.num_heads), attn.scale)

        return [attn.q.register_forward_hook(keep_query), attn.k.register_forward_hook(hook)]


for _reading in (TokenReading(), XCAReading(), XCATokenReading(), ClassAttentionReading()):
    READINGS.register(_reading.name)(_reading)


def default_reading(model: nn.Module) -> str:
    """The model family's default reading: the first registered reading that applies (``token`` for ViTs) among
    ``token`` and ``class_attention`` (XCiT's only token-to-token attention; see the SSTA spec for why)."""
    vit = unwrap_vit(model)
    for name in ("token", "class_attention"):
        if READINGS.get(name).applies(vit):
            return name
    raise ReproError(f"{type(vit).__name__} has no attention reading; known readings: {', '.join(READINGS.names())}")


def resolve_reading(model: nn.Module, reading: Optional[str]) -> Reading:
    """The reading object for ``model`` (``None`` / ``auto``: its family's default), checked to apply."""
    name = default_reading(model) if reading in (None, "auto") else reading
    if name not in READINGS.names():
        raise ReproError(f"unknown attention reading {name!r}; known: auto, {', '.join(READINGS.names())}")
    chosen = READINGS.get(name)
    vit = unwrap_vit(model)
    if not chosen.applies(vit):
        applicable = [n for n in READINGS.names() if READINGS.get(n).applies(vit)]
        raise ReproError(f"attention reading {name!r} does not apply to a {type(vit).__name__}; it has: "
                         f"{', '.join(applicable) or 'none'}")
    return chosen


def attention_modules(model: nn.Module, reading: Optional[str] = None) -> list[nn.Module]:
    return resolve_reading(model, reading).modules(unwrap_vit(model))


def block_attention(model: nn.Module, layer: int, reading: Optional[str] = None) -> nn.Module:
    """The attention module of layer ``layer`` of ``reading`` (negative indices count from the end)."""
    vit = unwrap_vit(model)
    if reading is None and not READINGS.get("token").applies(vit) and READINGS.get("class_attention").applies(vit):
        reading = "auto"  # an XCiT: its family's default reading
    chosen = resolve_reading(model, reading) if reading is not None else None
    if chosen is None:  # historical default: token attention of the blocks, with its own message
        blocks = unwrap_vit(model).blocks
        if not -len(blocks) <= layer < len(blocks):
            raise ReproError(f"layer {layer} is out of range for a ViT of depth {len(blocks)}")
        attn = getattr(blocks[layer], "attn", None)
        if not isinstance(attn, Attention):
            raise ReproError(f"block {layer} has {type(attn).__name__} attention; only timm's token Attention "
                             f"(softmax(QK^T)) is supported by the 'token' reading (XCiT: reading xca, "
                             f"class_attention or xca_tokens)")
        return attn
    modules = chosen.modules(unwrap_vit(model))
    if not -len(modules) <= layer < len(modules):
        raise ReproError(f"layer {layer} is out of range for reading {chosen.name!r}, which has {len(modules)} layers")
    return modules[layer]


def num_heads(model: nn.Module, layer: int = -1, reading: Optional[str] = None) -> int:
    return block_attention(model, layer, reading).num_heads


def depth(model: nn.Module, reading: Optional[str] = None) -> int:
    if reading is None:
        return len(unwrap_vit(model).blocks)
    return len(attention_modules(model, reading))


def dist_token_index(model: nn.Module) -> Optional[int]:
    """Token position of DeiT's distillation token (1, after cls), or None for models without one."""
    vit = unwrap_vit(model)
    return 1 if getattr(vit, "dist_token", None) is not None else None


def heads_log_attention(q: Tensor, k: Tensor, scale: Union[float, Tensor], temperature: float = 1.0) -> Tensor:
    """``log softmax(q k^T * scale / tau)`` over keys, in float32. q: [B, H, Nq, d], k: [B, H, Nk, d] ->
    [B, H, Nq, Nk]; ``scale`` a float or a per-head [H, 1, 1] tensor (XCA's learned temperature)."""
    # autocast would run the matmul in fp16/bf16 again; the maps and their KL are float32 (ssta.md 8.6).
    with torch.autocast(device_type=q.device.type, enabled=False):
        if isinstance(scale, Tensor):
            scale = scale.float()
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale / temperature
        return torch.log_softmax(scores, dim=-1)


class AttentionCapture:
    """Forward hooks that record attention log-probabilities of chosen heads of one layer.

    Args:
        model: a ``TimmViT`` / ``TimmXCiT`` or a bare timm model.
        layer: layer index within the reading's modules (negative counts from the end).
        heads: head indices (``None``: all heads).
        mode: ``heads`` -> [B, len(heads), Nq, Nk]; ``relation`` / ``mean`` -> [B, 1, Nq, Nk].
        temperature: divides the scores before the softmax (ssta.md 2.3.3, default 1, unknown in the paper).
        drop_dist_token: drop the distillation token's row and column (ssta.md 8.2); the log-softmax over the
            remaining keys is exactly the renormalised row, so a 198-token DeiT-distilled map becomes
            comparable with a 197-token teacher map (``token`` reading only: XCiT has no dist token).
        training_only: record only while the model is in training mode (a student: eval forwards cost nothing).
        reading: ``token``, ``xca``, ``class_attention``, ``xca_tokens`` or ``None``/``auto`` (the model's default).

    Recording happens only while ``enabled`` is True; ``pop()`` returns the last maps and forgets them.
    """

    def __init__(self, model: nn.Module, layer: int = -1, heads: Optional[Sequence[int]] = None,
                 mode: str = "heads", temperature: float = 1.0, drop_dist_token: bool = True,
                 training_only: bool = False, reading: Optional[str] = None) -> None:
        if mode not in CAPTURE_MODES:
            raise ReproError(f"unknown attention capture mode {mode!r}; known: {', '.join(CAPTURE_MODES)}")
        if temperature <= 0:
            raise ReproError(f"attention temperature must be positive, got {temperature}")
        chosen = resolve_reading(model, reading)
        if mode == "relation" and not chosen.supports_relation:
            raise ReproError(f"the relation mapping has no meaning for the {chosen.name!r} reading; use split or mean")
        attn = block_attention(model, layer, chosen.name)
        heads = list(range(attn.num_heads)) if heads is None else [int(h) for h in heads]
        bad = [h for h in heads if not 0 <= h < attn.num_heads]
        if bad or not heads:
            raise ReproError(f"head indices {heads} are invalid for a block with {attn.num_heads} heads")
        self.attn = attn
        self.reading = chosen.name
        self.layer = layer
        self.heads = heads
        self.mode = mode
        self.temperature = float(temperature)
        self.training_only = training_only
        drop = dist_token_index(model) if drop_dist_token and chosen.name == "token" else None
        self.drop_token = drop
        self.enabled = True
        self.maps: Optional[Tensor] = None
        self._indices: dict[Any, Tensor] = {}
        self._handles: list[RemovableHandle] = chosen.install(attn, self._on_qk, self._wanted)

    def _select(self, q: Tensor, k: Tensor, scale: Union[float, Tensor]
                ) -> tuple[Tensor, Tensor, Union[float, Tensor]]:
        index = self._index("heads", self.heads, q.device)
        q, k = q.index_select(1, index), k.index_select(1, index)
        if isinstance(scale, Tensor):
            scale = scale.index_select(0, index)
        if self.drop_token is not None:
            tokens = q.shape[2]
            keep = self._index(("keep", tokens), [i for i in range(tokens) if i != self.drop_token], q.device)
            q, k = q.index_select(2, keep), k.index_select(2, keep)
        return q, k, scale

    def _index(self, key: Any, values: Sequence[int], device: torch.device) -> Tensor:
        """An index tensor built once per (key, device): a ``torch.tensor(list, device=cuda)`` on every forward
        is a blocking host-to-device copy."""
        cache_key = (key, str(device))
        index = self._indices.get(cache_key)
        if index is None:
            index = self._indices[cache_key] = torch.tensor(list(values), dtype=torch.long, device=device)
        return index

    def compute(self, q: Tensor, k: Tensor, scale: Union[float, Tensor]) -> Tensor:
        q, k, scale = self._select(q, k, scale)
        if self.mode == "relation":
            batch, heads, queries, dim = q.shape
            q_cat = q.transpose(1, 2).reshape(batch, 1, queries, heads * dim)
            k_cat = k.transpose(1, 2).reshape(batch, 1, k.shape[2], heads * dim)
            return heads_log_attention(q_cat, k_cat, 1.0 / math.sqrt(heads * dim), self.temperature)
        log_maps = heads_log_attention(q, k, scale, self.temperature)
        if self.mode == "mean":
            return torch.logsumexp(log_maps, dim=1, keepdim=True) - math.log(log_maps.shape[1])
        return log_maps

    def _wanted(self) -> bool:
        return self.enabled and not (self.training_only and not self.attn.training)

    def _on_qk(self, q: Tensor, k: Tensor, scale: Union[float, Tensor]) -> None:
        self.maps = self.compute(q, k, scale)

    def pop(self) -> Tensor:
        if self.maps is None:
            raise RuntimeError(f"no attention maps were captured at layer {self.layer} (was the model run, "
                               f"in training mode for a student capture?)")
        maps, self.maps = self.maps, None
        return maps

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.maps = None


def attention_kl(target_log: Tensor, student_log: Tensor) -> Tensor:
    """KL(target || student) over keys, averaged over query rows, heads and batch, in float32 (ssta.md 2.3.3).

    Both inputs come from log_softmax of finite scores, so they are finite and an underflowed target
    probability contributes exactly 0.
    """
    if target_log.shape != student_log.shape:
        raise ReproError(f"attention maps differ in shape: target {tuple(target_log.shape)} vs student "
                         f"{tuple(student_log.shape)} (different patch size or image size?)")
    target_log = target_log.float().detach()
    student_log = student_log.float()
    return (target_log.exp() * (target_log - student_log)).sum(dim=-1).mean()
