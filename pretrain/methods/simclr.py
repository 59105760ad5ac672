"""SimCLR (Chen et al. 2020; v2 head, REMEDIS recipe) on the shared engine: contrast two views.

Per step: two independently augmented views of every image go through the backbone *together*
(one call, so BatchNorm normalises over both views, as in SimCLR's TPU code) and the projection
head; NT-Xent pulls the two views of an image together against every other view in the *global*
batch. Negatives from all ranks are gathered with `all_gather_with_grad`, whose backward returns
each rank its slice of the summed gradients, so 2 ranks x B images train like 1 x 2B images.
Under DDP on GPU the BatchNorms become SyncBatchNorm (`simclr.sync_bn`): per-rank BN statistics
leak which samples share a rank and let the network cheat the contrastive task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig
from torch import Tensor, nn

from pretrain import distributed as du
from pretrain.backbones import build_backbone
from pretrain.components.heads import projection_head
from pretrain.components.losses import nt_xent_loss
from pretrain.config import ConfigError
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState, check_augmentation
from pretrain.optim import param_groups_lrd
from pretrain.transforms import SimCLRTransform

logger = logging.getLogger(__name__)


def zero_init_residual_(backbone: nn.Module) -> int:
    """Zero the scale of each residual block's last BatchNorm (Goyal et al. 2017), as SimCLR's
    ResNet does (`init_zero=True`) and timm does by default: every block starts as the identity.
    Returns how many were zeroed (0 for a ViT)."""
    last_norms = [
        m.bn3 if isinstance(m, torchvision.models.resnet.Bottleneck) else m.bn2
        for m in backbone.modules()
        if isinstance(
            m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
        )
    ]
    for norm in last_norms:
        nn.init.zeros_(norm.weight)
    return len(last_norms)


@register_method("simclr")
class SimCLR(SSLMethod):
    name = "simclr"
    section = "simclr"  # the config section with the method's keys (simclr3d: its own)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        name, c = cls.section, cfg[cls.section]
        if float(c.temperature) <= 0:
            raise ConfigError(f"{name}.temperature must be > 0, got {c.temperature}")
        if int(c.proj_layers) < 1:
            raise ConfigError(f"{name}.proj_layers must be >= 1, got {c.proj_layers}")
        lo, hi = (float(v) for v in c.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"{name}.crop_scale must be [min, max] with 0 < min <= max <= 1")
        if "preset" in c:  # simclr3d views volumes: no intensity preset
            check_augmentation(name, c)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = cfg[self.section]
        self.c = c
        self.backbone = build_backbone(cfg.model)
        if bool(c.zero_init_residual):
            self.init_residual()
        dim = int(self.backbone.num_features)
        hidden = int(c.proj_hidden_dim or dim)
        self.head = projection_head(
            dim, hidden, int(c.proj_out_dim), int(c.proj_layers), bool(c.proj_bn)
        )
        self.temperature = float(c.temperature)
        self.img_size = int(c.img_size or cfg.model.img_size)
        synced = False
        if bool(c.sync_bn) and du.is_dist() and torch.distributed.get_backend() == "nccl":
            # SyncBatchNorm runs on GPUs only; gloo/CPU runs keep per-rank BN (documented above)
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)
            synced = True
        logger.info(
            "%s: %s (%d features), head %d layers -> %d, temperature %.3g, SyncBN %s",
            self.name,
            cfg.model.arch,
            dim,
            int(c.proj_layers),
            int(c.proj_out_dim),
            self.temperature,
            synced,
        )

    def init_residual(self) -> int:
        """Zero-initialise the residual branches (SimCLR's init_zero); returns how many."""
        return zero_init_residual_(self.backbone)

    def build_transform(self) -> Callable:
        channels = self.cfg.data.channels or int(self.cfg.model.in_chans)
        return SimCLRTransform(
            self.img_size,
            scale=tuple(self.c.crop_scale),
            preset=str(self.c.preset),
            jitter_strength=float(self.c.jitter_strength),
            channels=channels,
        )

    @staticmethod
    def views_of(batch: Any) -> tuple[Tensor, Tensor]:
        views = batch
        if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)):
            views = batch[0]  # (views, labels) from the loader
        if isinstance(views, (list, tuple)) and len(views) == 2 and isinstance(views[0], Tensor):
            return views[0], views[1]
        raise TypeError(
            "simclr expects batches ([view1 B x C x H x W, view2], labels) from build_transform"
        )

    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        v1, v2 = (v.to(state.device, non_blocking=True) for v in self.views_of(batch))
        z = self.head(self.backbone(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature)
        with torch.no_grad():
            pos = F.cosine_similarity(z1.float(), z2.float(), dim=-1).mean()
        return loss, {"positive_cosine": pos}

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        groups = param_groups_lrd(
            self.backbone,
            layer_decay=float(o.layer_decay),
            patch_embed_lr_mult=float(o.patch_embed_lr_mult),
            prefix="backbone.",
        )
        return groups + param_groups_lrd(self.head, prefix="head.", num_layers=0)

    def backbone_for_export(self) -> nn.Module:
        return self.backbone

    @torch.no_grad()
    def monitor_embeddings(self, batch: Any) -> Tensor:
        v1, _ = self.views_of(batch)
        return self.backbone(v1.to(next(self.backbone.parameters()).device)).float()

    def ddp_modules(self) -> list[nn.Module]:
        return [self]
