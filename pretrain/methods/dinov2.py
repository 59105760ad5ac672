"""DINOv2 (Oquab et al. 2023) on the shared engine: self-distillation with an EMA teacher.

Per step: the teacher (EMA of the student, never backpropagated) sees the 2 global crops; the
student sees the same global crops -- with block-masked patches on half of them -- and the local
crops. Losses: DINO cross-entropy between teacher and student class-token prototypes (every view
against every *other* global view), iBOT cross-entropy on the masked patch tokens, and KoLeo on the
student's global class tokens. The teacher targets are sharpened (temperature warmup 0.04 -> 0.07)
and balanced by softmax-centering or Sinkhorn-Knopp. Optionally (`dinov2.gram`), DINOv3's Gram
anchoring: a frozen snapshot of the EMA teacher's backbone, retaken every `update_every` steps,
whose patch-similarity matrices on the global crops the student's must match.

Speed: one student backbone pass for all crops (the globals concatenated, the locals
concatenated, both sizes through the blocks together: `vit_tokens_groups`), one student head call
for all local/global class tokens and masked patches together, one teacher head call, and the EMA
as a single fused `torch._foreach_lerp_` over all parameters. Student blocks with a drop-path rate
above 0.1 run each residual branch on the samples they keep only (DINOv2's
`drop_add_residual_stochastic_depth`).
"""

from __future__ import annotations

import copy
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
from pretrain.components.losses import DINOLoss, gram_loss, iBOTPatchLoss, koleo_loss
from pretrain.components.masked_vit import vit_tokens, vit_tokens_groups
from pretrain.components.masks import BlockMaskGenerator, MultiCropCollate
from pretrain.config import ConfigError, plain
from pretrain.distributed import is_dist
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, StepState, check_augmentation
from pretrain.optim import param_groups_lrd
from pretrain.schedules import self_distillation_schedules
from pretrain.transforms import MultiCropTransform

logger = logging.getLogger(__name__)


class MaskToken(nn.Module):
    """The learned embedding that replaces masked patches in the student (zeros at start, DINOv2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, dim))


class DINOv2Network(nn.Module):
    """Backbone + DINO head (+ iBOT head when separate) (+ mask token for the student).

    `forward` is the whole student pass, so that DDP/FSDP wrapping the student sees one call.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: nn.Module,
        ibot_head: nn.Module | None,
        mask_token: MaskToken | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.mask_token = mask_token
        self.is_vit = isinstance(backbone, VisionTransformer)

    def tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.is_vit:
            token = None if self.mask_token is None else self.mask_token.mask_token
            return vit_tokens(self.backbone, x, masks, token)
        if masks is not None:
            raise ValueError("iBOT masking needs a ViT backbone (set dinov2.ibot.loss_weight=0)")
        return self.backbone(x), None

    def tokens_groups(
        self, crops: list[Tensor], masks: list[Tensor | None]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """`tokens` of each crop size; a ViT runs all sizes through its blocks together."""
        if self.is_vit:
            token = None if self.mask_token is None else self.mask_token.mask_token
            return vit_tokens_groups(self.backbone, crops, masks, token)
        return [self.tokens(x, m) for x, m in zip(crops, masks, strict=True)]

    def heads(
        self, cls_parts: list[Tensor], patches: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One DINO-head call for all class tokens (and masked patches when the head is shared)."""
        sizes = [p.shape[0] for p in cls_parts]
        if patches is not None and self.ibot_head is None:
            out = self.dino_head(torch.cat([*cls_parts, patches]))
            return out[: sum(sizes)], out[sum(sizes) :]
        cls_out = (
            self.dino_head(torch.cat(cls_parts))
            if len(cls_parts) > 1
            else self.dino_head(cls_parts[0])
        )
        patch_out = None if patches is None else self.ibot_head(patches)
        return cls_out, patch_out

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: Tensor | None,
        mask_indices: Tensor | None,
    ) -> dict[str, Tensor | None]:
        """Student pass: one backbone pass for both crop sizes, one head call. Returns logits +
        features."""
        if local_crops is not None and local_crops.shape[0] > 0:
            (global_cls, global_patches), (local_cls, _) = self.tokens_groups(
                [global_crops, local_crops], [masks, None]
            )
            cls_parts = [global_cls, local_cls]
        else:
            global_cls, global_patches = self.tokens(global_crops, masks)
            cls_parts = [global_cls]
        masked = None
        if mask_indices is not None:
            masked = global_patches.flatten(0, 1).index_select(0, mask_indices)
        cls_logits, patch_logits = self.heads(cls_parts, masked)
        n_global = global_cls.shape[0]
        return {
            "global_cls": global_cls,
            "global_patches": global_patches,
            "global_logits": cls_logits[:n_global],
            "local_logits": cls_logits[n_global:] if len(cls_parts) > 1 else None,
            "masked_patch_logits": patch_logits,
        }

    @torch.no_grad()
    def teacher_forward(
        self, global_crops: Tensor, mask_indices: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher pass on the unmasked global crops: class logits and the logits of the patches
        that the student sees masked."""
        cls, patches = self.tokens(global_crops)
        masked = None
        if mask_indices is not None:
            masked = patches.flatten(0, 1).index_select(0, mask_indices)
        return self.heads([cls], masked)


def _is_last_layer(name: str) -> bool:
    return name.startswith("last_layer.") or ".last_layer." in name


@register_method("dinov2")
class DINOv2(SSLMethod):
    name = "dinov2"

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        c = cfg.dinov2
        is_vit = str(cfg.model.arch) in VIT_SIZES
        if float(c.ibot.loss_weight) > 0 and not is_vit:
            raise ConfigError(
                f"dinov2.ibot.loss_weight > 0 needs a ViT; model.arch={cfg.model.arch}: "
                "set dinov2.ibot.loss_weight=0"
            )
        if str(c.centering) not in ("centering", "sinkhorn_knopp"):
            raise ConfigError("dinov2.centering must be centering or sinkhorn_knopp")
        lo, hi = (float(v) for v in c.ibot.mask_ratio_min_max)
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(
                "dinov2.ibot.mask_ratio_min_max must be [min, max], 0 <= min <= max < 1"
            )
        if not 0.0 <= float(c.ibot.mask_sample_probability) <= 1.0:
            raise ConfigError("dinov2.ibot.mask_sample_probability must be in [0, 1]")
        if int(c.crops.local_crops_number) < 0:
            raise ConfigError("dinov2.crops.local_crops_number must be >= 0")
        check_augmentation("dinov2.crops", c.crops)
        g = c.gram
        if float(g.loss_weight) < 0:
            raise ConfigError("dinov2.gram.loss_weight must be >= 0 (0 turns Gram anchoring off)")
        if float(g.loss_weight) > 0:
            if not is_vit:
                raise ConfigError(
                    f"dinov2.gram.loss_weight > 0 compares patch tokens and needs a ViT; "
                    f"model.arch={cfg.model.arch}"
                )
            if int(g.update_every) < 0:
                raise ConfigError("dinov2.gram.update_every must be >= 0 (0: never refreshed)")
            if not 0 <= int(g.first_step) < int(cfg.optim.max_steps):
                raise ConfigError(
                    f"dinov2.gram.first_step={g.first_step} must be in [0, optim.max_steps="
                    f"{cfg.optim.max_steps}): Gram anchoring would never start"
                )
        if not is_vit:
            return
        patch = int(cfg.model.patch_size)
        for key in ("global_crops_size", "local_crops_size"):
            size = int(c.crops[key])
            if size % patch:
                raise ConfigError(
                    f"dinov2.crops.{key}={size} is not a multiple of model.patch_size={patch} "
                    "(DINOv2 ViT-*/14 uses 224 and 98)"
                )
        dynamic = bool(cfg.model.dynamic_img_size)
        if int(c.crops.global_crops_size) != int(cfg.model.img_size) and not dynamic:
            raise ConfigError(
                "dinov2.crops.global_crops_size differs from model.img_size: "
                "set model.dynamic_img_size=true"
            )
        if int(c.crops.local_crops_number) and not dynamic:
            raise ConfigError(
                "dinov2.crops.local_crops_number > 0 needs model.dynamic_img_size=true "
                "(position embeddings resampled)"
            )

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        c = cfg.dinov2
        self.c = c
        backbone = build_backbone(cfg.model)
        embed_dim = int(backbone.num_features)
        self.do_ibot = float(c.ibot.loss_weight) > 0
        self.do_koleo = float(c.dino.koleo_loss_weight) > 0
        self.n_local = int(c.crops.local_crops_number)
        self.global_size = int(c.crops.global_crops_size)
        self.local_size = int(c.crops.local_crops_size)
        mask_generator = None
        if self.do_ibot:
            mask_generator = BlockMaskGenerator(self.global_size // int(cfg.model.patch_size))
        self.batch_collate = MultiCropCollate(
            mask_generator,
            tuple(c.ibot.mask_ratio_min_max),
            float(c.ibot.mask_sample_probability),
        )

        def head(section: DictConfig) -> DINOHead:
            return DINOHead(
                embed_dim,
                int(section.head_n_prototypes),
                int(section.head_hidden_dim),
                int(section.head_bottleneck_dim),
                int(section.head_nlayers),
                use_bn=bool(section.head_use_bn),
                center_bottleneck=bool(section.head_center_bottleneck),
            )

        separate = self.do_ibot and bool(c.ibot.separate_head)
        self.student = DINOv2Network(
            backbone,
            head(c.dino),
            head(c.ibot) if separate else None,
            MaskToken(embed_dim) if self.do_ibot else None,
        )
        teacher = make_ema_teacher(self.student)
        teacher.mask_token = None  # the teacher never sees masked inputs
        self.teacher = teacher
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] | None = None
        # Gram anchoring: a frozen backbone snapshot of the EMA teacher (the initial one until
        # first_step). Only built when on, so checkpoints without it keep loading.
        self.gram_weight = float(c.gram.loss_weight)
        self.gram_backbone = copy.deepcopy(teacher.backbone) if self.gram_weight > 0 else None
        self._gram_pairs: tuple[list[Tensor], list[Tensor]] | None = None

        centering = str(c.centering)
        ibot_dim = int(c.ibot.head_n_prototypes if separate else c.dino.head_n_prototypes)
        self.dino_loss = DINOLoss(
            int(c.dino.head_n_prototypes),
            float(c.student_temp),
            float(c.center_momentum),
            centering,
            int(c.sinkhorn_iterations),
        )
        self.ibot_loss = iBOTPatchLoss(
            ibot_dim,
            float(c.student_temp),
            float(c.center_momentum),
            centering,
            int(c.sinkhorn_iterations),
        )
        logger.info(
            "DINOv2: %s (%d features), %d prototypes, iBOT %s (%s head), KoLeo %.3g, %s, "
            "crops 2x%d + %dx%d",
            cfg.model.arch,
            embed_dim,
            c.dino.head_n_prototypes,
            self.do_ibot,
            "separate" if separate else "shared",
            c.dino.koleo_loss_weight,
            centering,
            self.global_size,
            self.n_local,
            self.local_size,
        )

    # ------------------------------------------------------------------------------ mode, data

    def train(self, mode: bool = True) -> DINOv2:
        super().train(mode)
        set_teacher_mode(self.teacher, mode)
        if self.gram_backbone is not None:
            set_teacher_mode(self.gram_backbone, mode)
        return self

    def build_transform(self) -> Callable:
        c = self.c.crops
        # Blur probabilities inside MultiCropTransform are the intended 1.0 (global 1) / 0.1
        # (global 2) / 0.5 (locals). DINOv2's code passes p to a GaussianBlur that applies it as
        # 1 - p, so it never blurs global crop 1 and blurs global crop 2 with p = 0.9; we do not.
        return MultiCropTransform(
            self.global_size,
            self.local_size,
            self.n_local,
            global_scale=tuple(c.global_crops_scale),
            local_scale=tuple(c.local_crops_scale),
            preset=str(c.preset),
            jitter_strength=float(c.jitter_strength),
            channels=self.cfg.data.channels,
        )

    def collate_fn(self) -> Callable[[list], Any]:
        """Crop-major tensors and iBOT masks, built in the loader workers."""
        return self.batch_collate

    def prepare_batch(self, batch: Any) -> dict[str, Any]:
        """A collated batch ((batch dict, labels) from `collate_fn`) as is; a batch of views as
        default_collate makes them (bench, tests) gets its crops and masks here."""
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if isinstance(batch, dict) and "masks" in batch:
            return batch
        if not isinstance(batch, dict) or "global_crops" not in batch:
            raise TypeError(
                "dinov2 expects batches of multi-crop views {'global_crops', 'local_crops'} "
                f"(from build_transform), got {type(batch).__name__}"
            )
        return self.batch_collate.crops(batch)

    # ------------------------------------------------------------------------------ the step

    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        b = self.prepare_batch(batch)
        device = state.device
        move = {
            k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
            for k, v in b.items()
        }
        global_crops, local_crops = move["global_crops"], move["local_crops"]
        masks, mask_indices = move["masks"], move["mask_indices"]
        if mask_indices is not None and mask_indices.numel() == 0 and not is_dist():
            masks = mask_indices = None  # nothing masked in this batch (tiny grids)
        n_global = 2
        batch_size = global_crops.shape[0] // n_global
        teacher_temp = float(state.values.get("teacher_temp", self.c.teacher.teacher_temp))

        with torch.no_grad():
            t_cls_logits, t_patch_logits = self.teacher.teacher_forward(global_crops, mask_indices)
            t_probs = self.dino_loss.teacher_probs(t_cls_logits, teacher_temp)
            t_probs = t_probs.view(n_global, batch_size, -1)
            t_patch_probs = None
            if t_patch_logits is not None:
                t_patch_probs = self.ibot_loss.teacher_probs(t_patch_logits, teacher_temp)

        out = self.student(global_crops, local_crops, masks, mask_indices)
        k = out["global_logits"].shape[-1]
        local_logits = out["local_logits"]
        dino = self.dino_loss(
            out["global_logits"].view(n_global, batch_size, k),
            None if local_logits is None else local_logits.view(-1, batch_size, k),
            t_probs,
        )
        loss = float(self.c.dino.loss_weight) * dino
        terms: dict[str, Tensor] = {"dino": dino.detach()}
        if self.do_koleo:
            # Per global crop (never between two views of the same image), summed as in DINOv2.
            koleo = sum(koleo_loss(chunk) for chunk in out["global_cls"].chunk(n_global))
            loss = loss + float(self.c.dino.koleo_loss_weight) * koleo
            terms["koleo"] = koleo.detach() / n_global
        if t_patch_probs is not None:
            ibot = self.ibot_loss(out["masked_patch_logits"], t_patch_probs, masks)
            loss = loss + float(self.c.ibot.loss_weight) * ibot
            terms["ibot"] = ibot.detach()
        if self.gram_backbone is not None and state.step >= int(self.c.gram.first_step):
            with torch.no_grad():
                _, anchor = vit_tokens(self.gram_backbone, global_crops)
            gram = gram_loss(out["global_patches"], anchor, bool(self.c.gram.remove_neg))
            loss = loss + self.gram_weight * gram
            terms["gram"] = gram.detach()
        return loss, terms

    # ------------------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        student = self.student
        groups = param_groups_lrd(
            student.backbone,
            layer_decay=float(o.layer_decay),
            patch_embed_lr_mult=float(o.patch_embed_lr_mult),
            prefix="backbone.",
        )
        n_blocks = len(getattr(student.backbone, "blocks", []))
        if student.mask_token is not None:
            # An embedding-level parameter: the deepest layer decay, like patch/pos embeddings.
            groups += param_groups_lrd(
                student.mask_token,
                layer_decay=float(o.layer_decay),
                prefix="mask_token.",
                num_layers=n_blocks,
            )
        for name in ("dino_head", "ibot_head"):
            head = getattr(student, name)
            if head is not None:
                groups += param_groups_lrd(
                    head, is_last_layer=_is_last_layer, prefix=f"{name}.", num_layers=0
                )
        return groups

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self_distillation_schedules(
            self.scaled_lr_schedule(total_steps),
            steps_per_epoch,
            freeze_last_layer_epochs=float(self.c.freeze_last_layer_epochs),
            **plain(self.c.teacher),
        )

    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        if self._ema_pairs is None:
            self._ema_pairs = ema_pairs(self.teacher, self.student)
        return self._ema_pairs

    @torch.no_grad()
    def on_after_step(self, state: StepState) -> None:
        momentum = float(state.values.get("momentum", self.c.teacher.momentum_teacher))
        ema_update_(*self._pairs(), momentum)
        if self.gram_backbone is not None and self.gram_refresh_before(state.step + 1):
            if self._gram_pairs is None:
                self._gram_pairs = ema_pairs(self.gram_backbone, self.teacher.backbone)
            torch._foreach_copy_(*self._gram_pairs)
            logger.info("step %d: Gram teacher retaken from the EMA teacher", state.step + 1)

    def gram_refresh_before(self, step: int) -> bool:
        """Whether the Gram teacher is retaken from the EMA teacher before `step` runs: at
        first_step (step 0 needs nothing: the snapshot starts equal to the initial teacher), then
        every update_every steps. A pure function of the step, so a resumed run refreshes at the
        same steps; the snapshot itself is in the checkpoint (a module of the method)."""
        g = self.c.gram
        first, every = int(g.first_step), int(g.update_every)
        if step <= 0 or step < first:
            return False
        return step == first or (every > 0 and (step - first) % every == 0)

    # ------------------------------------------------------------------------------ outputs

    def backbone_for_export(self) -> nn.Module:
        return self.teacher.backbone  # DINOv2 evaluates (and releases) the teacher

    @torch.no_grad()
    def monitor_embeddings(self, batch: Any) -> dict[str, Tensor]:
        """Teacher class tokens of the first global crops, and the teacher's target distributions
        on them (with the current center, without updating it) for the entropy monitors."""
        views = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(views, dict) and "masks" in views:
            crops = views["global_crops"]
            first = crops[: crops.shape[0] // 2]
        else:
            first = views["global_crops"][0]
        first = first.to(next(self.teacher.parameters()).device)
        cls, _ = self.teacher.tokens(first)
        logits, _ = self.teacher.heads([cls], None)
        temp = float(self.c.teacher.teacher_temp)
        if self.dino_loss.centering == "sinkhorn_knopp":
            probs = torch.softmax(logits.float() / temp, dim=-1)
        else:
            probs = self.dino_loss.softmax_center(logits, temp)
        return {"embeddings": cls.float(), "probs": probs}

    def ddp_modules(self) -> list[nn.Module]:
        return [self.student]
