"""A timm VisionTransformer's forward, split where self-supervised methods need to act on tokens.

timm's `forward_features` has no hook between the patch embedding and the blocks, where iBOT
replaces masked patches by a learned token (before position embeddings, as DINOv2 does) and MAE
drops the patches it hides (after them). These functions redo its steps from the model's public
attributes (`patch_embed`, `cls_token`, `reg_token`, `pos_embed`, `no_embed_class`,
`dynamic_img_size`, `patch_drop`, `norm_pre`, `blocks`, `norm`) and timm's public
`resample_abs_pos_embed`, honouring gradient checkpointing; they never touch timm's private
methods, and with nothing masked they give exactly `vit.forward_features`.

`vit_tokens_groups` runs crops of several sizes (DINOv2's global and local crops) through the
blocks together, as DINOv2's `forward_features_list` does with xformers' block-diagonal masks:
every linear layer multiplies all groups' tokens at once, attention stays within each crop. Blocks
training with a drop-path rate above 0.1 compute each residual branch only for the samples they
keep, DINOv2's stochastic-depth shortcut (ViT-B/L recipes: rates 0.2-0.4).

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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def blocks_run_grouped(vit: VisionTransformer) -> bool:
    """Whether `vit_encode_groups` can share the blocks' linear layers between groups: every block
    is timm's plain `Block` with its `Attention` (an FSDP-sharded block is a subclass, whose
    parameters are gathered only by its own forward, so it runs group by group)."""
    return all(type(b) is Block and type(b.attn) is Attention for b in vit.blocks)


# DINOv2 computes a residual branch on a random subset of the samples, instead of computing it
# for every sample and zeroing the dropped ones, when a block's drop-path rate is above this.
SUBSET_DROP_PATH_ABOVE = 0.1


def _attention_rows(attn: Attention, h: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """timm's `Attention.forward` on stacked rows `h` of (B, N) groups: one qkv and one output
    projection for all rows, scaled dot-product attention within each group."""
    width = attn.num_heads * attn.head_dim
    gate_layer = getattr(attn, "gate", None)  # newer timm versions only
    gate = gate_layer(h).sigmoid() if gate_layer is not None else None
    outs = []
    for qkv, (b, n) in zip(attn.qkv(h).split([b * n for b, n in shapes]), shapes, strict=True):
        q, k, v = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(
            attn.q_norm(q),
            attn.k_norm(k),
            v,
            dropout_p=attn.attn_drop.p if attn.training else 0.0,
            scale=attn.scale,
        )
        outs.append(o.transpose(1, 2).reshape(b * n, width))
    h = torch.cat(outs)
    if getattr(attn, "norm", None) is not None:  # scale_norm (an Identity when off)
        h = attn.norm(h)
    if gate is not None:
        h = h * gate
    return attn.proj_drop(attn.proj(h))


def _grouped_block(block: Block, x: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """timm's `Block.forward` + `Attention.forward` on the rows of several (B, N, D) token groups
    stacked as one (sum B*N, D) matrix; attention and per-sample drop path run group by group."""

    def attention(rows: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        return block.ls1(_attention_rows(block.attn, block.norm1(rows), groups))

    def mlp(rows: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        return block.ls2(block.mlp(block.norm2(rows)))

    x = _add_residual(x, attention, block.drop_path1, shapes)
    return _add_residual(x, mlp, block.drop_path2, shapes)


def _add_residual(
    x: Tensor,
    branch: Callable[[Tensor, list[tuple[int, int]]], Tensor],
    drop_path: torch.nn.Module,
    shapes: list[tuple[int, int]],
) -> Tensor:
    """`x + drop_path(branch(x))` on stacked groups. A timm `DropPath` training at a rate above
    SUBSET_DROP_PATH_ABOVE takes DINOv2's shortcut (`drop_add_residual_stochastic_depth`): the
    branch runs only on a random max(1, int(B * (1 - rate))) of each group's B samples, added back
    scaled by B / kept, so the dropped samples cost no compute. Other drop paths run per group."""
    rate = float(drop_path.drop_prob) if isinstance(drop_path, DropPath) else 0.0
    if drop_path.training and rate > SUBSET_DROP_PATH_ABOVE:
        index, scales, kept_shapes, offset = [], [], [], 0
        for b, n in shapes:
            kept = max(1, int(b * (1 - rate)))
            samples = torch.randperm(b, device=x.device)[:kept]
            tokens = torch.arange(n, device=x.device)
            index.append(offset + (samples[:, None] * n + tokens).flatten())
            scales.append(x.new_full((kept * n, 1), b / kept))
            kept_shapes.append((kept, n))
            offset += b * n
        rows = torch.cat(index)
        update = branch(x.index_select(0, rows), kept_shapes) * torch.cat(scales)
        return x.index_add(0, rows, update)
    out = branch(x, shapes)
    if isinstance(drop_path, torch.nn.Identity):
        return x + out
    rows_per_group = [b * n for b, n in shapes]
    dropped = [  # drop path keeps or drops whole samples: apply it per group
        drop_path(part.view(b, n, -1)).view(b * n, -1)
        for part, (b, n) in zip(out.split(rows_per_group), shapes, strict=True)
    ]
    return x + torch.cat(dropped)


def vit_encode_groups(vit: VisionTransformer, token_groups: list[Tensor]) -> list[Tensor]:
    """`vit_encode` of each group of input tokens (B_i, N_i, D), e.g. one per crop size, run through
    the blocks together when `blocks_run_grouped(vit)`: one matmul and one weight gradient per
    linear layer for all groups instead of one per group, which matters when a group is small
    (local crops); attention and drop path stay within each group. In training, a block whose drop
    path is above SUBSET_DROP_PATH_ABOVE runs its branches on a random subset of each group's
    samples (DINOv2's shortcut, `_add_residual`); the per-group fallback keeps timm's drop path."""
    if not blocks_run_grouped(vit):
        return [vit_encode(vit, tokens) for tokens in token_groups]
    groups = [vit.norm_pre(vit.patch_drop(tokens)) for tokens in token_groups]
    shapes = [(g.shape[0], g.shape[1]) for g in groups]
    x = torch.cat([g.flatten(0, 1) for g in groups])
    for block in vit.blocks:
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_grouped_block, block, x, shapes, use_reentrant=False)
        else:
            x = _grouped_block(block, x, shapes)
    x = vit.norm(x)
    rows = [b * n for b, n in shapes]
    return [part.view(b, n, -1) for part, (b, n) in zip(x.split(rows), shapes, strict=True)]


def vit_tokens_groups(
    vit: VisionTransformer,
    images: list[Tensor],
    masks: list[Tensor | None] | None = None,
    mask_token: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """`vit_tokens` for each batch of `images` (one per crop size), through `vit_encode_groups`.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
        ...                         num_classes=0, dynamic_img_size=True)
        >>> big, small = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
        >>> (cls_big, _), (cls_small, patches_small) = vit_tokens_groups(vit, [big, small])
        >>> torch.allclose(cls_small, vit_tokens(vit, small)[0], atol=1e-5), patches_small.shape
        (True, torch.Size([6, 4, 192]))
    """
    masks = masks if masks is not None else [None] * len(images)
    inputs = [vit_embed(vit, x, m, mask_token) for x, m in zip(images, masks, strict=True)]
    return [(t[:, 0], t[:, vit.num_prefix_tokens :]) for t in vit_encode_groups(vit, inputs)]


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
