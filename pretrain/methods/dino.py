"""DINO (Caron et al. 2021) on the shared engine: self-distillation with no labels, multi-crop.

The method several pathology foundation models were trained with. Per step: an EMA teacher sees the
2 global crops; the student sees them and the local crops; the loss is the cross-entropy between
the teacher's centred, sharpened prototype distribution and the student's, for every student crop
against every *other* teacher crop. No iBOT, no KoLeo, no mask token (that is DINOv2). Any backbone
works: its pooled output (a ViT's class token, a ResNet's average pool) feeds the head.

Built only from components: DINOHead, DINOLoss, the EMA teacher helpers, the multi-crop transform
and collate, the self-distillation schedules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pretrain.backbones import VIT_SIZES, build_backbone
from pretrain.components.ema import ema_pairs, ema_update_, make_ema_teacher, set_teacher_mode
from pretrain.components.heads import DINOHead
from pretrain.components.losses import DINOLoss
from pretrain.components.masked_vit import vit_embed, vit_encode_groups
from pretrain.components.masks import MultiCropCollate
from pretrain.config import ConfigError, plain
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState, check_augmentation
from pretrain.optim import param_groups_lrd
from pretrain.schedules import self_distillation_schedules
from pretrain.transforms import MultiCropTransform

logger = logging.getLogger(__name__)


class DINONetwork(nn.Module):
    """Backbone + head; one backbone pass for both crop sizes (a ViT's blocks take them together,
    another backbone one call per size) and one head call per step."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None) -> Tensor:
        crops = [global_crops]
        if local_crops is not None and local_crops.shape[0] > 0:
            crops.append(local_crops)
        backbone = self.backbone
        if isinstance(backbone, VisionTransformer) and len(crops) > 1:
            tokens = vit_encode_groups(backbone, [vit_embed(backbone, x) for x in crops])
            features = [backbone.forward_head(t) for t in tokens]  # the backbone's own pooling
        else:
            features = [backbone(x) for x in crops]
        return self.head(torch.cat(features))


@register_method("dino")
class DINO(SSLMethod):
    name = "dino"

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        c = cfg.dino
        if str(cfg.model.arch) in VIT_SIZES:
            patch, dynamic = int(cfg.model.patch_size), bool(cfg.model.dynamic_img_size)
            for key in ("global_crops_size", "local_crops_size"):
                if int(c.crops[key]) % patch:
                    raise ConfigError(
                        f"dino.crops.{key}={c.crops[key]} is not a multiple of "
                        f"model.patch_size={patch}"
                    )
            other_size = int(c.crops.global_crops_size) != int(cfg.model.img_size)
            if (other_size or int(c.crops.local_crops_number) > 0) and not dynamic:
                raise ConfigError(
                    "dino crops of another size than model.img_size need model.dynamic_img_size=true"
                )
        if int(c.crops.local_crops_number) < 0:
            raise ConfigError("dino.crops.local_crops_number must be >= 0")
        check_augmentation("dino.crops", c.crops)
        if float(c.student_temp) <= 0 or float(c.teacher.teacher_temp) <= 0:
            raise ConfigError("dino.student_temp and dino.teacher.teacher_temp must be > 0")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = self.c = cfg.dino
        backbone = build_backbone(cfg.model)
        head = DINOHead(
            int(backbone.num_features),
            int(c.head_n_prototypes),
            int(c.head_hidden_dim),
            int(c.head_bottleneck_dim),
            int(c.head_nlayers),
            use_bn=bool(c.head_use_bn),
            center_bottleneck=bool(c.head_center_bottleneck),
        )
        if bool(
            c.norm_last_layer
        ):  # DINO: prototypes of fixed norm 1 (the weight-norm gain frozen)
            head.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.student = DINONetwork(backbone, head)
        self.teacher = make_ema_teacher(self.student)
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] | None = None
        self.loss = DINOLoss(
            int(c.head_n_prototypes), float(c.student_temp), float(c.center_momentum)
        )
        self.n_local = int(c.crops.local_crops_number)
        logger.info(
            "DINO: %s (%d features), %d prototypes, crops 2x%d + %dx%d",
            cfg.model.arch,
            int(backbone.num_features),
            int(c.head_n_prototypes),
            int(c.crops.global_crops_size),
            self.n_local,
            int(c.crops.local_crops_size),
        )

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        set_teacher_mode(self.teacher, mode)
        return self

    def build_transform(self) -> Callable:
        c = self.c.crops
        return MultiCropTransform(
            int(c.global_crops_size),
            int(c.local_crops_size),
            self.n_local,
            global_scale=tuple(c.global_crops_scale),
            local_scale=tuple(c.local_crops_scale),
            preset=str(c.preset),
            jitter_strength=float(c.jitter_strength),
            channels=self.cfg.data.channels,
        )

    def collate_fn(self) -> Callable[[list], Any]:
        return MultiCropCollate()  # crop-major views, in the loader workers

    @staticmethod
    def crops_of(batch: Any) -> dict[str, Tensor | None]:
        views = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(views, dict) and "masks" not in views and "global_crops" in views:
            views = MultiCropCollate().crops(views)  # views as default_collate makes them
        if not isinstance(views, dict) or "global_crops" not in views:
            raise TypeError("dino expects multi-crop batches {'global_crops', 'local_crops'}")
        return views

    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        crops = self.crops_of(batch)
        global_crops = crops["global_crops"].to(state.device, non_blocking=True)
        local_crops = crops["local_crops"]
        if local_crops is not None:
            local_crops = local_crops.to(state.device, non_blocking=True)
        batch_size = global_crops.shape[0] // 2
        temp = float(state.values.get("teacher_temp", self.c.teacher.teacher_temp))
        with torch.no_grad():
            teacher_probs = self.loss.teacher_probs(self.teacher(global_crops), temp)
        logits = self.student(global_crops, local_crops)
        k = logits.shape[-1]
        n_global = 2 * batch_size
        local = logits[n_global:].view(-1, batch_size, k) if logits.shape[0] > n_global else None
        loss = self.loss(
            logits[:n_global].view(2, batch_size, k), local, teacher_probs.view(2, batch_size, k)
        )
        return loss, {"dino": loss.detach()}

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        groups = param_groups_lrd(
            self.student.backbone,
            layer_decay=float(o.layer_decay),
            patch_embed_lr_mult=float(o.patch_embed_lr_mult),
            prefix="backbone.",
        )
        return groups + param_groups_lrd(self.student.head, prefix="head.", num_layers=0)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self_distillation_schedules(
            self.scaled_lr_schedule(total_steps),
            steps_per_epoch,
            freeze_last_layer_epochs=float(self.c.freeze_last_layer_epochs),
            **plain(self.c.teacher),
        )

    @torch.no_grad()
    def on_after_step(self, state: StepState) -> None:
        if self._ema_pairs is None:
            self._ema_pairs = ema_pairs(self.teacher, self.student)
        momentum = float(state.values.get("momentum", self.c.teacher.momentum_teacher))
        ema_update_(*self._ema_pairs, momentum)

    def backbone_for_export(self) -> nn.Module:
        return self.teacher.backbone  # DINO evaluates the teacher

    @torch.no_grad()
    def monitor_embeddings(self, batch: Any) -> dict[str, Tensor]:
        crops = self.crops_of(batch)["global_crops"]
        first = crops[: crops.shape[0] // 2].to(next(self.teacher.parameters()).device)
        features = self.teacher.backbone(first)
        probs = self.loss.softmax_center(
            self.teacher.head(features), float(self.c.teacher.teacher_temp)
        )
        return {"embeddings": features.float(), "probs": probs}

    def ddp_modules(self) -> list[nn.Module]:
        return [self.student]
