"""MAE (He et al. 2022; RETFound recipe) on the shared engine: reconstruct masked patches.

Per step: each image keeps a random 25% of its patches (per-sample argsort of uniform noise, as in
the MAE code); the encoder (the exported timm ViT, class token included) sees only those; a light
transformer decoder gets the encoded tokens plus a shared mask token at every removed position
(fixed 2-D sin-cos positions) and predicts every patch's pixels. Loss: mean squared error on the
*removed* patches only, against pixels normalised per patch (`norm_pix_loss`, MAE's best setting).

The masking happens after the position embeddings (pretrain.components.masked_vit), so every kept
patch keeps its own position (resampled for other image sizes with dynamic_img_size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from pretrain.backbones import VIT_SIZES, build_backbone
from pretrain.components.heads import MAEDecoder
from pretrain.components.losses import mae_loss, patchify
from pretrain.components.masked_vit import vit_encode_visible
from pretrain.components.masks import random_masking
from pretrain.config import ConfigError
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState
from pretrain.optim import param_groups_lrd
from pretrain.transforms import mae_transform

logger = logging.getLogger(__name__)


@register_method("mae")
class MAE(SSLMethod):
    name = "mae"

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        c = cfg.mae
        if str(cfg.model.arch) not in VIT_SIZES:
            raise ConfigError(f"mae needs a ViT backbone (model.arch), got {cfg.model.arch}")
        if str(c.global_pool) not in ("token", "avg"):
            raise ConfigError(f"mae.global_pool must be token or avg, got {c.global_pool!r}")
        patch, img_size = int(cfg.model.patch_size), int(c.img_size or cfg.model.img_size)
        if img_size % patch:
            raise ConfigError(
                f"mae.img_size={img_size} is not a multiple of model.patch_size={patch}"
            )
        if img_size != int(cfg.model.img_size) and not cfg.model.dynamic_img_size:
            raise ConfigError(
                "mae.img_size differs from model.img_size: set model.dynamic_img_size"
            )
        if not 0.0 <= float(c.mask_ratio) < 1.0:
            raise ConfigError(f"mae.mask_ratio must be in [0, 1), got {c.mask_ratio}")
        n_patches = (img_size // patch) ** 2
        if int(n_patches * (1 - float(c.mask_ratio))) < 1:
            raise ConfigError(
                f"mae.mask_ratio={c.mask_ratio} keeps none of the {n_patches} patches"
            )
        if int(c.decoder_embed_dim) % 4 or int(c.decoder_embed_dim) % int(c.decoder_num_heads):
            raise ConfigError(
                "mae.decoder_embed_dim must be divisible by 4 (sin-cos positions) and by "
                "mae.decoder_num_heads"
            )

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = cfg.mae
        self.c = c
        encoder = build_backbone(cfg.model)
        pool = str(c.global_pool)
        if pool == "avg":
            # RETFound / MAE fine-tuning: features = mean of the (final-normed) patch tokens. The
            # export records it (fc_norm=False keeps timm's `norm` key), so timm users get it too.
            encoder.global_pool = "avg"
            encoder.timm_kwargs = {**encoder.timm_kwargs, "global_pool": "avg", "fc_norm": False}
        self.encoder = encoder
        self.patch = int(cfg.model.patch_size)
        self.img_size = int(c.img_size or cfg.model.img_size)
        self.mask_ratio = float(c.mask_ratio)
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
        latent = vit_encode_visible(self.encoder, images, ids_keep)
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
