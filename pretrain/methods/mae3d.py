"""MAE on volumes (3D MAE as in Chen et al. 2023 / MONAI's ViT autoencoder pretraining): reconstruct
masked cube patches of a CT/MR volume.

The same method as `mae` (random per-sample masking of `mask_ratio` of the patches, a light
decoder with mask tokens and fixed sin-cos positions, per-patch normalised MSE on the removed
patches), with the 3D pieces swapped in: a MONAI ViT with a 3D patch embedding as the encoder
(exported for MONAI, features = mean of its normed tokens), cube patches (`patchify3d`), 3-D
sin-cos positions in the decoder and the volume crops of transforms3d.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from pretrain.backbones import VIT3D_ARCHS, build_backbone
from pretrain.components.heads import MAEDecoder
from pretrain.components.losses import mae_loss, patchify3d
from pretrain.components.masked_vit import monai_vit_encode_visible
from pretrain.components.masks import random_masking
from pretrain.config import ConfigError
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState
from pretrain.optim import param_groups_lrd
from pretrain.transforms3d import mae3d_transform

logger = logging.getLogger(__name__)


def volumes_of(batch: Any, method: str) -> Tensor:
    volumes = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(volumes, Tensor) or volumes.ndim != 5:
        raise TypeError(
            f"{method} expects batches of B x C x D x H x W volumes (a volume dataset: 3D "
            f"MedMNIST .npz, volume shards), got {getattr(volumes, 'shape', type(volumes))}"
        )
    return volumes


@register_method("mae3d")
class MAE3D(SSLMethod):
    name = "mae3d"

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        c = cfg.mae3d
        if str(cfg.model.arch) not in VIT3D_ARCHS:
            raise ConfigError(
                f"mae3d needs a 3D ViT (model.arch in {VIT3D_ARCHS}), got {cfg.model.arch}"
            )
        patch, size = int(cfg.model.patch_size), int(cfg.model.img_size)
        if size % patch:
            raise ConfigError(
                f"model.img_size={size} is not a multiple of model.patch_size={patch}"
            )
        if not 0.0 <= float(c.mask_ratio) < 1.0:
            raise ConfigError(f"mae3d.mask_ratio must be in [0, 1), got {c.mask_ratio}")
        n_patches = (size // patch) ** 3
        if int(n_patches * (1 - float(c.mask_ratio))) < 1:
            raise ConfigError(
                f"mae3d.mask_ratio={c.mask_ratio} keeps none of the {n_patches} patches"
            )
        if int(c.decoder_embed_dim) % 6 or int(c.decoder_embed_dim) % int(c.decoder_num_heads):
            raise ConfigError(
                "mae3d.decoder_embed_dim must be divisible by 6 (3-D sin-cos positions) and by "
                "mae3d.decoder_num_heads"
            )
        lo, hi = (float(v) for v in c.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError("mae3d.crop_scale must be [min, max] with 0 < min <= max <= 1")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = self.c = cfg.mae3d
        self.encoder = build_backbone(cfg.model)
        self.patch = int(cfg.model.patch_size)
        self.size = int(cfg.model.img_size)
        self.mask_ratio = float(c.mask_ratio)
        self.norm_pix = bool(c.norm_pix_loss)
        grid = self.size // self.patch
        self.decoder = MAEDecoder(
            int(self.encoder.num_features),
            int(c.decoder_embed_dim),
            int(c.decoder_depth),
            int(c.decoder_num_heads),
            (grid, grid, grid),
            self.patch**3 * int(cfg.model.in_chans),
        )
        logger.info(
            "MAE-3D: %s encoder, %d/%d cube patches kept, decoder %d x %d",
            cfg.model.arch,
            int(grid**3 * (1 - self.mask_ratio)),
            grid**3,
            int(c.decoder_depth),
            int(c.decoder_embed_dim),
        )

    def build_transform(self) -> Callable:
        return mae3d_transform(self.size, scale=tuple(self.c.crop_scale))

    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        volumes = volumes_of(batch, self.name).to(state.device, non_blocking=True)
        n = (self.size // self.patch) ** 3
        ids_keep, mask, ids_restore = random_masking(
            volumes.shape[0], n, self.mask_ratio, volumes.device
        )
        latent = monai_vit_encode_visible(self.encoder, volumes, ids_keep)
        pred = self.decoder(latent, ids_restore, 0)
        loss = mae_loss(pred, patchify3d(volumes, self.patch), mask, self.norm_pix)
        return loss, {"mask_ratio": mask.mean().detach()}

    def param_groups(self) -> list[dict]:
        return param_groups_lrd(self.encoder, prefix="encoder.", num_layers=0) + param_groups_lrd(
            self.decoder, prefix="decoder.", num_layers=0
        )

    def backbone_for_export(self) -> nn.Module:
        return self.encoder

    @torch.no_grad()
    def monitor_embeddings(self, batch: Any) -> Tensor:
        volumes = volumes_of(batch, self.name).to(next(self.encoder.parameters()).device)
        return self.encoder(volumes).float()
