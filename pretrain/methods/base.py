"""The contract between the training engine and one self-supervised method.

A method owns its modules (student/teacher backbones, heads), its views, its loss and its per-step
updates (EMA, last-layer freezing). The engine owns everything else: data, precision, DDP/FSDP,
optimizer, schedules, checkpoints, logs. So adding a method is one file plus one YAML section.

Schedules a method returns are read by the engine at every step into `state.values[name]` and
logged. One name has a meaning for the engine itself:
  "last_layer_lr": the absolute lr used for param groups flagged `is_last_layer` instead of the
  scheduled lr (DINOv2: the lr schedule with zeros while the head's last layer is frozen). Build it
  from `state`-independent quantities with `self.lr_schedule` (set by the engine before calling
  `schedules`: the scaled lr schedule every other group follows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import default_collate

from pretrain.config import ConfigError
from pretrain.transforms import PRESETS

logger = logging.getLogger(__name__)


def check_augmentation(section: str, views: DictConfig) -> None:
    """Refuse an unknown `<section>.preset` or a negative `<section>.jitter_strength` before any
    work: the transform itself is built only when the loader starts."""
    if str(views.preset) not in PRESETS:
        raise ConfigError(
            f"{section}.preset={views.preset!r} is unknown; choose one of {', '.join(PRESETS)}"
        )
    if float(views.jitter_strength) < 0:
        raise ConfigError(
            f"{section}.jitter_strength must be >= 0 (0: no intensity jitter), "
            f"got {views.jitter_strength}"
        )


@dataclass
class StepState:
    """What a method may know about the step it is computing (read-only for the method)."""

    step: int
    max_steps: int
    epoch: int
    world_size: int
    rank: int
    device: torch.device
    lr: float
    wd: float
    values: dict[str, float] = field(default_factory=dict)
    autocast_dtype: torch.dtype | None = None


class SSLMethod(nn.Module):
    """Base class: subclass, set `name`, decorate with `@register_method(name)`."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        # Scaled lr schedule the engine drives every group with; set before `schedules()` is called.
        self.lr_schedule: np.ndarray | None = None

    # ---- config --------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Refuse values of the method's section (and the engine keys it depends on) that it cannot
        train with, raising pretrain.config.ConfigError that names the key. `validate` calls it
        before any work: `python -m pretrain --check`, launch's pre-queue check and every run."""

    # ---- data ----------------------------------------------------------------------------------
    def build_transform(self) -> Callable:
        """Per-sample view transform for the loader (input: float C×H×W in [0, 1])."""
        raise NotImplementedError(f"{type(self).__name__} must define build_transform()")

    def collate_fn(self) -> Callable[[list], Any]:
        """The loader's collate, run in its workers: per-batch inputs (masks, crop-major views)
        are built there, not in the training step. Return a small picklable callable, not a
        bound method of this module (workers would receive a copy of the whole model)."""
        return default_collate

    # ---- step ----------------------------------------------------------------------------------
    def forward_loss(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss to backpropagate + detached named terms to log.

        `batch` is what the loader yields: (collated views, labels), on `state.device`. Under
        FSDP every module call of the step must happen in here (it runs as the root's forward).
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward_loss()")

    def forward(self, batch: Any, state: StepState) -> tuple[Tensor, dict[str, Tensor]]:
        # DDP hooks run on forward(); routing through it lets DDP wrap the whole method.
        return self.forward_loss(batch, state)

    def param_groups(self) -> list[dict]:
        """Default: layer-wise decay over all trainable params from cfg.optim."""
        from pretrain.optim import param_groups_lrd

        optim = self.cfg.optim
        return param_groups_lrd(
            self,
            1.0,
            float(optim.layer_decay),
            float(optim.patch_embed_lr_mult),
        )

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {}

    def scaled_lr_schedule(self, total_steps: int) -> np.ndarray:
        """The engine's lr schedule (for schedules that follow it, e.g. "last_layer_lr")."""
        if self.lr_schedule is None:
            raise RuntimeError("the engine must set method.lr_schedule before calling schedules()")
        if len(self.lr_schedule) != total_steps:
            raise RuntimeError(
                f"lr_schedule has {len(self.lr_schedule)} steps, schedules() asked for {total_steps}"
            )
        return np.asarray(self.lr_schedule, dtype=np.float64)

    def on_after_backward(self, state: StepState) -> None:
        """Hook between backward and the optimizer step (e.g. cancel last-layer grads)."""

    @torch.no_grad()
    def on_after_step(self, state: StepState) -> None:
        """Hook after a successful optimizer step (e.g. EMA teacher update)."""

    # ---- outputs -------------------------------------------------------------------------------
    def backbone_for_export(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define backbone_for_export()")

    def monitor_embeddings(self, batch: Any) -> Tensor | dict[str, Tensor] | None:
        """Embeddings (B, D) of a batch for the collapse monitors; None to skip them.

        May instead return {"embeddings": (B, D), "probs": (B, K)} where probs are the teacher's
        output distributions (prototype methods), which adds the teacher-entropy monitors.
        """
        return None

    @torch.no_grad()
    def export_features(self, images: Tensor) -> Tensor:
        """Pooled features of the exported backbone (online k-NN); routed through the method so
        that FSDP gathers parameters for it like for a training forward."""
        return self.backbone_for_export()(images)

    def ddp_modules(self) -> list[nn.Module]:
        """Modules that receive gradients; EMA teachers are not in this list."""
        return [self]

    # ---- continued pretraining -----------------------------------------------------------------
    def backbone_modules(self) -> list[nn.Module]:
        """Every backbone built by `build_backbone` (they carry `medssl_config`): what `init.from`
        loads (DINOv2: student and EMA teacher alike, so the teacher starts equal to the student).
        Override only for a backbone not built by build_backbone."""
        return [m for m in self.modules() if hasattr(m, "medssl_config")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters: frozen by the engine during `init.heads_only_steps`."""
        return [p for m in self.backbone_modules() for p in m.parameters() if p.requires_grad]
