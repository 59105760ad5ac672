"""MAE (He et al. 2022; RETFound recipe) on the shared engine: reconstruct masked patches.

Per step: each image keeps a random 25% of its patches (per-sample argsort of uniform noise, as in
the MAE code); the encoder (the exported timm ViT, class token included) sees only those; a light
transformer decoder gets the encoded tokens plus a shared mask token at every removed position
(fixed 2-D sin-cos positions) and predicts every patch's pixels. Loss: mean squared error on the
*removed* patches only, against pixels normalised per patch (`norm_pix_loss`, MAE's best setting).

The masking happens after `vit._pos_embed`, so position embeddings (resampled for other image
sizes with dynamic_img_size) and register tokens are handled by timm itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from pretrain.backbones import build_backbone
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState
from pretrain.optim import param_groups_lrd
from pretrain.transforms import mae_transform

logger = logging.getLogger(__name__)


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), row-major patches, pixels (p, q, c) as in MAE."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sin-cos positions (N, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE: meshgrid(w, h) puts the column index first
    return torch.from_numpy(np.concatenate([embed(rows), embed(cols)], axis=1)).float()


def random_masking(batch: int, n_patches: int, mask_ratio: float, device: torch.device):
    """MAE's per-sample shuffle: (ids_keep (B, K), mask (B, N) 1 = removed, ids_restore (B, N))."""
    n_keep = int(n_patches * (1 - mask_ratio))
    if n_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {n_patches}")
    noise = torch.rand(batch, n_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, n_patches, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean over removed patches of the per-patch MSE; targets normalised per patch if norm_pix
    (mean, unbiased variance + 1e-6, exactly MAE's `forward_loss`)."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def encode_visible(vit: VisionTransformer, images: Tensor, ids_keep: Tensor | None) -> Tensor:
    """Encoder pass on the kept patches: (B, prefix + K, D) after the final norm."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)  # (B, prefix + N, D): flattens (B, H, W, D) and adds positions
    if ids_keep is not None:
        prefix, patches = x[:, : vit.num_prefix_tokens], x[:, vit.num_prefix_tokens :]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


class MAEDecoder(nn.Module):
    """MAE decoder: embed, insert mask tokens, unshuffle, sin-cos positions, blocks, pixel head."""

    def __init__(
        self, embed_dim: int, dim: int, depth: int, heads: int, grid: int, patch_pixels: int
    ):
        super().__init__()
        self.grid = grid
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor, n_prefix: int) -> Tensor:
        x = self.decoder_embed(latent)
        patches = x[:, n_prefix:]
        n = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(x.shape[0], n - patches.shape[1], -1)
        patches = torch.cat([patches, fill], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = torch.gather(patches, 1, index) + self.pos_embed.to(x.dtype)
        x = torch.cat([x[:, :n_prefix], patches], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, n_prefix:])


@register_method("mae")
class MAE(SSLMethod):
    name = "mae"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = cfg.mae
        self.c = c
        encoder = build_backbone(cfg.model)
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(f"MAE needs a ViT backbone, model.arch={cfg.model.arch}")
        pool = str(c.global_pool)
        if pool not in ("token", "avg"):
            raise ValueError(f"mae.global_pool must be token or avg, got {pool!r}")
        if pool == "avg":
            # RETFound / MAE fine-tuning: features = mean of the (final-normed) patch tokens. The
            # export records it (fc_norm=False keeps timm's `norm` key), so timm users get it too.
            encoder.global_pool = "avg"
            encoder.timm_kwargs = {**encoder.timm_kwargs, "global_pool": "avg", "fc_norm": False}
        self.encoder = encoder
        self.patch = int(cfg.model.patch_size)
        self.img_size = int(c.img_size or cfg.model.img_size)
        if self.img_size % self.patch:
            raise ValueError(
                f"mae.img_size={self.img_size} is not a multiple of model.patch_size={self.patch}"
            )
        if self.img_size != int(cfg.model.img_size) and not cfg.model.dynamic_img_size:
            raise ValueError("mae.img_size differs from model.img_size: set model.dynamic_img_size")
        self.mask_ratio = float(c.mask_ratio)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        self.norm_pix = bool(c.norm_pix_loss)
        self.channels = int(cfg.model.in_chans)
        grid = self.img_size // self.patch
        self.decoder = MAEDecoder(
            int(encoder.num_features),
            int(c.decoder_embed_dim),
            int(c.decoder_depth),
            int(c.decoder_num_heads),
            grid,
            self.patch * self.patch * self.channels,
        )
        logger.info(
            "MAE: %s encoder, %d/%d patches kept, decoder %d x %d, norm_pix_loss %s, pooling %s",
            cfg.model.arch,
            int(grid * grid * (1 - self.mask_ratio)),
            grid * grid,
            int(c.decoder_depth),
            int(c.decoder_embed_dim),
            self.norm_pix,
            pool,
        )

    def build_transform(self) -> Callable:
        channels = self.cfg.data.channels or int(self.cfg.model.in_chans)
        return mae_transform(self.img_size, scale=tuple(self.c.crop_scale), channels=channels)

    @staticmethod
    def images_of(batch: Any) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise TypeError(f"mae expects batches of B x C x H x W images, got {type(images)}")
        return images

    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.images_of(batch).to(state.device, non_blocking=True)
        n = (images.shape[-2] // self.patch) * (images.shape[-1] // self.patch)
        ids_keep, mask, ids_restore = random_masking(
            images.shape[0], n, self.mask_ratio, images.device
        )
        latent = encode_visible(self.encoder, images, ids_keep)
        pred = self.decoder(latent, ids_restore, self.encoder.num_prefix_tokens)
        loss = mae_loss(pred, patchify(images, self.patch), mask, self.norm_pix)
        return loss, {"mask_ratio": mask.mean().detach()}

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        groups = param_groups_lrd(
            self.encoder,
            layer_decay=float(o.layer_decay),
            patch_embed_lr_mult=float(o.patch_embed_lr_mult),
            prefix="encoder.",
        )
        return groups + param_groups_lrd(self.decoder, prefix="decoder.", num_layers=0)

    def backbone_for_export(self) -> nn.Module:
        return self.encoder

    @torch.no_grad()
    def monitor_embeddings(self, batch: Any) -> Tensor:
        images = self.images_of(batch).to(next(self.encoder.parameters()).device)
        return self.encoder(images).float()

    def ddp_modules(self) -> list[nn.Module]:
        return [self]
