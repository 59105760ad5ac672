"""Every check of a pretraining config that can run before any work: engine keys, data specs,
backbone, then the method's own `check_config`. `python -m pretrain` (also with --check), launch's
pre-queue validation and bench scripts all call `validate`, so a bad value costs seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pretrain.backbones import BackboneError, is_volume_backbone, resolve_backbone_config
from pretrain.checkpoint import RESUME_MODES
from pretrain.config import ConfigError
from pretrain.data.specs import DatasetSpecError, holds_volumes, parse_spec
from pretrain.init_from import LAYOUT_CHOICES
from pretrain.methods import get_method_class
from pretrain.schedules import LR_SCALING_RULES
from pretrain.trackers import WANDB_MODES, wandb_available

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")


def validate(cfg: DictConfig) -> None:
    """Refuse configs that would fail later, naming the key (raises ConfigError): the engine's
    keys here, the method's in its `check_config`. Fills data.channels from model.in_chans when
    it is null."""
    try:
        method = get_method_class(str(cfg.method))
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from exc
    try:
        resolve_backbone_config(cfg.model)
    except BackboneError as exc:
        raise ConfigError(f"model: {exc}") from exc
    specs = [("data.train", cfg.data.train)]
    if int(cfg.monitor.knn_every) > 0:
        if not cfg.monitor.knn_train or not cfg.monitor.knn_test:
            raise ConfigError("monitor.knn_every > 0 needs monitor.knn_train and monitor.knn_test")
        specs += [
            ("monitor.knn_train", cfg.monitor.knn_train),
            ("monitor.knn_test", cfg.monitor.knn_test),
        ]
    volume_model = is_volume_backbone(cfg.model)
    for key, spec in specs:
        try:
            volumes = holds_volumes(parse_spec(str(spec)))
        except DatasetSpecError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
        if volumes is not None and volumes != volume_model:
            raise ConfigError(
                f"{key}: {spec} holds {'volumes' if volumes else '2D images'} but model.arch="
                f"{cfg.model.arch} is a {'3D' if volume_model else '2D'} backbone; "
                + (
                    "train volumes with a 3D method and backbone (e.g. method=mae3d "
                    "model.arch=vit3d_tiny, method=simclr3d model.arch=resnet3d_18)"
                    if volumes
                    else "a 3D backbone needs a volume dataset"
                )
            )
    checks = [
        (str(cfg.train.precision) in PRECISIONS, f"train.precision must be one of {PRECISIONS}"),
        (
            str(cfg.optim.lr_scaling) in LR_SCALING_RULES,
            f"optim.lr_scaling must be one of {LR_SCALING_RULES}",
        ),
        (int(cfg.optim.max_steps) >= -1, "optim.max_steps must be >= 0 (or -1 for optim.epochs)"),
        (int(cfg.data.batch_size) >= 1, "data.batch_size must be >= 1"),
        (int(cfg.data.num_workers) >= 0, "data.num_workers must be >= 0"),
        (int(cfg.train.checkpoint_every) >= 1, "train.checkpoint_every must be >= 1"),
        (int(cfg.train.keep_last) >= 0, "train.keep_last must be >= 0 (0 keeps every checkpoint)"),
        (str(cfg.train.resume) in RESUME_MODES, f"train.resume must be one of {RESUME_MODES}"),
        (len(cfg.optim.betas) == 2, "optim.betas must be [beta1, beta2]"),
        (
            str(cfg.train.device) in ("auto", "cpu", "cuda"),
            "train.device must be auto, cpu or cuda",
        ),
        (
            str(cfg.dist.backend) in ("auto", "nccl", "gloo"),
            "dist.backend must be auto, nccl or gloo",
        ),
        (
            not (cfg.dist.fsdp and str(cfg.train.precision) == "fp16"),
            "dist.fsdp with train.precision=fp16 is not supported (GradScaler is not shard-aware): use bf16",
        ),
        (int(cfg.init.heads_only_steps) >= 0, "init.heads_only_steps must be >= 0"),
        (
            str(cfg.logging.wandb_mode) in WANDB_MODES,
            f"logging.wandb_mode must be one of {WANDB_MODES}",
        ),
        (
            not cfg.logging.wandb or wandb_available(),
            "logging.wandb=true needs Weights & Biases: pip install 'medssl[wandb]'",
        ),
        (
            str(cfg.init.layout) in LAYOUT_CHOICES,
            f"init.layout must be one of {LAYOUT_CHOICES}",
        ),
        (
            cfg.init["from"] is None or Path(str(cfg.init["from"])).exists(),
            f"init.from: {cfg.init['from']} does not exist",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    in_chans = int(cfg.model.in_chans)
    if cfg.data.channels is None:
        cfg.data.channels = in_chans
    channels = (
        3
        if str(cfg.data.channels) in ("repeat", "3")
        else 1
        if str(cfg.data.channels) == "1"
        else None
    )
    if channels != in_chans:
        raise ConfigError(
            f"data.channels={cfg.data.channels!r} gives {channels} channel(s) but model.in_chans={in_chans}"
        )
    method.check_config(cfg)
