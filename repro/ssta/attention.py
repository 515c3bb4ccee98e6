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
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import Attention
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from repro.errors import ReproError

CAPTURE_MODES = ("heads", "relation", "mean")


def unwrap_vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside ``model`` (``TimmViT`` wrapper or a bare timm ViT)."""
    vit = getattr(model, "vit", model)
    if not isinstance(getattr(vit, "blocks", None), nn.Sequential):
        raise ReproError(f"{type(model).__name__} is not a timm ViT (no .blocks); attention terms need one")
    return vit


def block_attention(model: nn.Module, layer: int) -> Attention:
    """The ``Attention`` module of block ``layer`` (negative indices count from the end)."""
    blocks = unwrap_vit(model).blocks
    if not -len(blocks) <= layer < len(blocks):
        raise ReproError(f"layer {layer} is out of range for a ViT of depth {len(blocks)}")
    attn = getattr(blocks[layer], "attn", None)
    if not isinstance(attn, Attention):
        raise ReproError(f"block {layer} has {type(attn).__name__} attention; only timm's token Attention "
                         f"(softmax(QK^T)) is supported")
    return attn


def num_heads(model: nn.Module, layer: int = -1) -> int:
    return block_attention(model, layer).num_heads


def depth(model: nn.Module) -> int:
    return len(unwrap_vit(model).blocks)


def dist_token_index(model: nn.Module) -> Optional[int]:
    """Token position of DeiT's distillation token (1, after cls), or None for models without one."""
    vit = unwrap_vit(model)
    return 1 if getattr(vit, "dist_token", None) is not None else None


def heads_log_attention(q: Tensor, k: Tensor, scale: float, temperature: float = 1.0) -> Tensor:
    """``log softmax(q k^T * scale / tau)`` over keys, in float32. q, k: [B, H, N, d] -> [B, H, N, N]."""
    # autocast would run the matmul in fp16/bf16 again; the maps and their KL are float32 (ssta.md 8.6).
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * (scale / temperature)
        return torch.log_softmax(scores, dim=-1)


class AttentionCapture:
    """Forward hook that records attention log-probabilities of chosen heads of one block.

    Args:
        model: a ``TimmViT`` or timm ViT.
        layer: block index (negative counts from the end).
        heads: head indices (``None``: all heads).
        mode: ``heads`` -> [B, len(heads), N, N]; ``relation`` / ``mean`` -> [B, 1, N, N].
        temperature: divides the scores before the softmax (ssta.md 2.3.3, default 1, unknown in the paper).
        drop_dist_token: drop the distillation token's row and column (ssta.md 8.2); the log-softmax over the
            remaining keys is exactly the renormalised row, so a 198-token DeiT-distilled map becomes
            comparable with a 197-token teacher map.
        training_only: record only while the model is in training mode (a student: eval forwards cost nothing).

    Recording happens only while ``enabled`` is True; ``pop()`` returns the last maps and forgets them.
    """

    def __init__(self, model: nn.Module, layer: int = -1, heads: Optional[Sequence[int]] = None,
                 mode: str = "heads", temperature: float = 1.0, drop_dist_token: bool = True,
                 training_only: bool = False) -> None:
        if mode not in CAPTURE_MODES:
            raise ReproError(f"unknown attention capture mode {mode!r}; known: {', '.join(CAPTURE_MODES)}")
        if temperature <= 0:
            raise ReproError(f"attention temperature must be positive, got {temperature}")
        attn = block_attention(model, layer)
        heads = list(range(attn.num_heads)) if heads is None else [int(h) for h in heads]
        bad = [h for h in heads if not 0 <= h < attn.num_heads]
        if bad or not heads:
            raise ReproError(f"head indices {heads} are invalid for a block with {attn.num_heads} heads")
        self.attn = attn
        self.layer = layer
        self.heads = heads
        self.mode = mode
        self.temperature = float(temperature)
        self.training_only = training_only
        drop = dist_token_index(model) if drop_dist_token else None
        self.drop_token = drop
        self.enabled = True
        self.maps: Optional[Tensor] = None
        self._indices: dict[Any, Tensor] = {}
        self._handle: Optional[RemovableHandle] = attn.qkv.register_forward_hook(self._hook)

    def _split_qk(self, qkv_out: Tensor) -> tuple[Tensor, Tensor]:
        attn = self.attn
        batch, tokens, _ = qkv_out.shape
        qkv = qkv_out.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        index = self._index("heads", self.heads, qkv_out.device)
        q = qkv[:, :, 0].index_select(2, index).transpose(1, 2)  # [B, h, N, d]
        k = qkv[:, :, 1].index_select(2, index).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)  # per-head norms (Identity in DeiT/ViT), as timm applies them
        if self.drop_token is not None:
            keep = self._index(("keep", tokens), [i for i in range(tokens) if i != self.drop_token], qkv_out.device)
            q, k = q.index_select(2, keep), k.index_select(2, keep)
        return q, k

    def _index(self, key: Any, values: Sequence[int], device: torch.device) -> Tensor:
        """An index tensor built once per (key, device): a ``torch.tensor(list, device=cuda)`` on every forward
        is a blocking host-to-device copy."""
        cache_key = (key, str(device))
        index = self._indices.get(cache_key)
        if index is None:
            index = self._indices[cache_key] = torch.tensor(list(values), dtype=torch.long, device=device)
        return index

    def compute(self, qkv_out: Tensor) -> Tensor:
        q, k = self._split_qk(qkv_out)
        if self.mode == "relation":
            batch, heads, tokens, dim = q.shape
            q_cat = q.transpose(1, 2).reshape(batch, 1, tokens, heads * dim)
            k_cat = k.transpose(1, 2).reshape(batch, 1, tokens, heads * dim)
            return heads_log_attention(q_cat, k_cat, 1.0 / math.sqrt(heads * dim), self.temperature)
        log_maps = heads_log_attention(q, k, self.attn.scale, self.temperature)
        if self.mode == "mean":
            return torch.logsumexp(log_maps, dim=1, keepdim=True) - math.log(log_maps.shape[1])
        return log_maps

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled or (self.training_only and not module.training):
            return
        self.maps = self.compute(output)

    def pop(self) -> Tensor:
        if self.maps is None:
            raise RuntimeError(f"no attention maps were captured at layer {self.layer} (was the model run, "
                               f"in training mode for a student capture?)")
        maps, self.maps = self.maps, None
        return maps

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
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
