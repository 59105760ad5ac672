"""SimCLR on volumes: two augmented 3D crops of a volume, NT-Xent against every other view in the
global batch.

Everything but the data and the backbone is `simclr`'s: projection head, loss, negatives gathered
across ranks, SyncBatchNorm under DDP, LARS recipe. The backbone is a MONAI 3D ResNet (or ViT),
exported for MONAI; views come from transforms3d (random box -> cube, flips, intensity jitter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

from pretrain.backbones import is_volume_backbone
from pretrain.backbones3d import zero_init_residual_3d_
from pretrain.config import ConfigError
from pretrain.methods import register_method
from pretrain.methods.simclr import SimCLR
from pretrain.transforms3d import SimCLR3DTransform

logger = logging.getLogger(__name__)


@register_method("simclr3d")
class SimCLR3D(SimCLR):
    name = "simclr3d"
    section = "simclr3d"

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if not is_volume_backbone(cfg.model):
            raise ConfigError(
                f"simclr3d needs a 3D backbone (model.arch resnet3d_* or vit3d_*), got {cfg.model.arch}"
            )
        super().check_config(cfg)

    def build_transform(self) -> Callable:
        return SimCLR3DTransform(self.img_size, scale=tuple(self.c.crop_scale))

    def init_residual(self) -> int:
        return zero_init_residual_3d_(self.backbone)
