"""A label-free objective to pretrain a small self-supervised teaching assistant for the smoke/proxy tiers.

SSTA's TAs are DINO / MoCo-v3 / MAE ViTs (ssta.md 2.4); offline, the smoke tier needs a TA it can train itself.
``masked_recon`` is masked-patch reconstruction with MAE's target and masking ratio (He et al. 2022: mask 75%
of the patches, predict the per-patch normalised pixels of the masked patches, MSE on masked patches only) and
SimMIM's architecture (Xie et al. 2022: masked patch embeddings are replaced by a learnable mask token, the
whole sequence goes through the encoder, and a linear decoder maps each output token to its patch's pixels).
The SimMIM form lets the Distiller's one student forward be the masked forward: a hook on ``patch_embed``
swaps in the mask token (training mode only) and a hook on the final norm hands the tokens to this term, so
no second forward is needed. The mask token and decoder belong to the term and are optimised with the student.

It never reads ``batch.labels`` or ``batch.targets`` and needs no teacher. Use it alone (``{masked_recon: 1}``):
with it, the student's logits in training come from masked images.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from repro.core.errors import ReproError
from repro.core.domains import BOOLEAN, OPEN_UNIT
from repro.data.batch import Batch
from repro.methods.base import LOSS_TERMS, LossTerm, Outputs, TermContext
from repro.methods.attention_readings import unwrap_vit


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, 3, H, W] -> [B, (H/p)*(W/p), p*p*3], patches in the row-major order of timm's patch embedding."""
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ReproError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch, channels, grid_h, patch, grid_w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch * patch * channels)


def random_patch_mask(batch: int, patches: int, ratio: float, device: torch.device) -> Tensor:
    """Boolean [B, L] with exactly round(ratio * L) True (masked) entries per row, uniformly at random."""
    masked = int(round(patches * ratio))
    ranks = torch.rand(batch, patches, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < masked


@LOSS_TERMS.register("masked_recon")
class MaskedPatchReconstruction(LossTerm):
    needs_teacher = False
    domains = {"mask_ratio": OPEN_UNIT, "norm_pix": BOOLEAN}

    def __init__(self, ctx: TermContext, mask_ratio: float = 0.75, norm_pix: bool = True) -> None:
        super().__init__(ctx)
        if not 0.0 < mask_ratio < 1.0:
            raise ReproError(f"masked_recon: mask_ratio must lie in (0, 1), got {mask_ratio}")
        vit = unwrap_vit(ctx.student)
        patch = vit.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else patch  # XCiT's ConvPatchEmbed keeps an int
        if patch[0] != patch[1]:
            raise ReproError(f"masked_recon needs square patches, got {patch}")
        self.patch = int(patch[0])
        self.mask_ratio = float(mask_ratio)
        self.norm_pix = bool(norm_pix)
        self.prefix_tokens = int(vit.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim, device=ctx.device))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(vit.embed_dim, self.patch * self.patch * 3, device=ctx.device)
        self._mask: Optional[Tensor] = None
        self._tokens: Optional[Tensor] = None
        vit.patch_embed.register_forward_hook(self._mask_patches)
        vit.norm.register_forward_hook(self._record_tokens)

    def _mask_patches(self, module: nn.Module, inputs: Any, output: Any) -> Optional[Any]:
        if not module.training:
            return None
        # XCiT's ConvPatchEmbed returns (tokens, (Hp, Wp)); timm's ViT patch embedding the tokens alone.
        embedded, rest = (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)
        if embedded.ndim != 3:
            raise ReproError("masked_recon needs a ViT whose patch embedding returns [B, L, C] tokens")
        mask = random_patch_mask(embedded.shape[0], embedded.shape[1], self.mask_ratio, embedded.device)
        self._mask = mask
        masked = torch.where(mask.unsqueeze(-1), self.mask_token.to(embedded.dtype), embedded)
        return masked if rest is None else (masked, *rest)

    def _record_tokens(self, module: nn.Module, inputs: Any, tokens: Tensor) -> None:
        if module.training:
            self._tokens = tokens

    def forward(self, out: Outputs, batch: Batch) -> Tensor:
        if self._mask is None or self._tokens is None:
            raise RuntimeError("masked_recon saw no masked student forward (was the student in training mode?)")
        mask, tokens = self._mask, self._tokens
        self._mask = self._tokens = None
        prediction = self.decoder(tokens[:, self.prefix_tokens:]).float()
        target = patchify(batch.images.float(), self.patch)
        if self.norm_pix:  # MAE's per-patch normalised pixel target
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (prediction - target).pow(2).mean(dim=-1)
        weights = mask.float()
        return (per_patch * weights).sum() / weights.sum()
