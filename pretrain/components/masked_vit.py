"""A timm VisionTransformer's forward, split where self-supervised methods need to act on tokens.

timm's `forward_features` has no hook between the patch embedding and the blocks, where iBOT
replaces masked patches by a learned token (before position embeddings, as DINOv2 does) and MAE
drops the patches it hides (after them). These functions redo its steps from the model's public
attributes (`patch_embed`, `cls_token`, `reg_token`, `pos_embed`, `no_embed_class`,
`dynamic_img_size`, `patch_drop`, `norm_pre`, `blocks`, `norm`) and timm's public
`resample_abs_pos_embed`, honouring gradient checkpointing; they never touch timm's private
methods, and with nothing masked they give exactly `vit.forward_features`.

Example:
    >>> import timm, torch
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    >>> images = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(vit_forward(vit, images), vit.forward_features(images), atol=1e-6)
    True
    >>> masks = torch.zeros(2, 16, dtype=torch.bool); masks[:, :4] = True
    >>> cls, patches = vit_tokens(vit, images, masks, torch.zeros(1, vit.embed_dim))
    >>> cls.shape, patches.shape
    (torch.Size([2, 192]), torch.Size([2, 16, 192]))
"""

from __future__ import annotations

import logging

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

logger = logging.getLogger(__name__)


def add_prefix_and_pos_embed(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Patch tokens (B, N, D) or (B, H, W, D) -> (B, prefix + N, D) with class/register tokens and
    position embeddings (resampled to the grid when the model has dynamic_img_size)."""
    prefix = []
    if vit.cls_token is not None:
        prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
    pos_embed = vit.pos_embed
    if x.ndim == 4:
        b, h, w, d = x.shape
        if pos_embed is not None and vit.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed,
                new_size=(h, w),
                old_size=vit.patch_embed.grid_size,
                num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
            )
        x = x.reshape(b, h * w, d)
    if pos_embed is None:
        return torch.cat([*prefix, x], dim=1)
    if vit.no_embed_class:  # the positions do not cover the prefix tokens: add, then concatenate
        x = torch.cat([*prefix, x + pos_embed], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos_embed
    return vit.pos_drop(x)


def vit_embed(
    vit: VisionTransformer,
    images: Tensor,
    masks: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> Tensor:
    """(B, prefix + N, D) input tokens; with `masks` (B, N) bool, masked patches are replaced by
    `mask_token` (1, D) right after the patch embedding (iBOT / DINOv2)."""
    x = vit.patch_embed(images)
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks given without a mask_token")
        replace = masks.view(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(replace, mask_token.to(x.dtype), x)
    return add_prefix_and_pos_embed(vit, x)


def vit_encode(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """Input tokens -> output tokens after the final norm (patch drop, pre-norm, blocks)."""
    x = vit.patch_drop(tokens)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def vit_forward(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Equal to `vit.forward_features(images)` (checked by the module example)."""
    return vit_encode(vit, vit_embed(vit, images))


def vit_tokens(
    vit: VisionTransformer,
    images: Tensor,
    masks: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(class token (B, D), patch tokens (B, N, D)) after the final norm, masked patches replaced."""
    x = vit_encode(vit, vit_embed(vit, images, masks, mask_token))
    return x[:, 0], x[:, vit.num_prefix_tokens :]


def vit_encode_visible(vit: VisionTransformer, images: Tensor, ids_keep: Tensor | None) -> Tensor:
    """MAE's encoder pass on the kept patches `ids_keep` (B, K): (B, prefix + K, D) after the final
    norm. Positions are added before dropping, so each kept patch keeps its own position."""
    x = vit_embed(vit, images)
    if ids_keep is not None:
        n_prefix = vit.num_prefix_tokens
        index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([x[:, :n_prefix], torch.gather(x[:, n_prefix:], 1, index)], dim=1)
    return vit_encode(vit, x)


def monai_vit_encode_visible(vit: torch.nn.Module, volumes: Tensor, ids_keep: Tensor) -> Tensor:
    """MAE's encoder pass for a MONAI ViT (3D patch embedding, no class token): (B, K, D) of the
    kept patches `ids_keep` (B, K) after the final norm; positions are added before dropping."""
    x = vit.patch_embedding(volumes)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)
