"""`python -m pretrain --config RECIPE [key=value ...]`: self-supervised pretraining.

Everything that can be checked before a (possibly 10-hour, 64-GPU) run starts is checked here:
config keys and types, the method, the backbone, the dataset specs, the precision, so a typo costs
seconds. Exit codes: 0 done, 2 refused before any work (bad config or data, or checkpoints in
output_dir of which none is readable), 3 aborted because training diverged (non-finite steps),
1 any other failure, 130 interrupted.
Running the same command again after a kill resumes from the newest readable checkpoint in
output_dir; `train.resume=fresh` starts at step 0 on purpose when none is readable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pretrain.config import ConfigError, load_config

logger = logging.getLogger("pretrain")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
PRECISIONS = ("bf16", "fp16", "fp32")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _chosen_method(recipe: str | None, overrides: Sequence[str]) -> str:
    """`method` from the last override, else the recipe, else the default."""
    for item in reversed(list(overrides)):
        if item.startswith("method="):
            return item.split("=", 1)[1]
    if recipe is not None and Path(recipe).is_file():
        try:
            loaded = OmegaConf.load(recipe)
        except Exception as exc:  # yaml errors come in many types
            raise ConfigError(f"{recipe}: not valid YAML: {exc}") from exc
        if isinstance(loaded, DictConfig) and loaded.get("method") is not None:
            return str(loaded.method)
    return str(OmegaConf.load(DEFAULT_CONFIG).method)


def compose_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """default.yaml + configs/method/<method>.yaml, then recipe and overrides, validated."""
    from pretrain.methods import get_method_class, method_config_path

    recipe = None if recipe is None else str(recipe)
    if recipe is not None and not Path(recipe).is_file():
        raise ConfigError(f"config file not found: {recipe}")
    name = _chosen_method(recipe, overrides)
    try:
        get_method_class(name)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from exc
    default = OmegaConf.load(DEFAULT_CONFIG)
    method_yaml = method_config_path(name)
    if method_yaml is not None:
        section = OmegaConf.load(method_yaml)
        extra = sorted(set(section.keys()) - {name})
        if extra:
            raise ConfigError(f"{method_yaml}: may only hold the '{name}:' section, found {extra}")
        default = OmegaConf.merge(default, section)
    with tempfile.TemporaryDirectory(prefix="medssl-config-") as tmp:
        merged_default = Path(tmp) / "default.yaml"
        OmegaConf.save(default, merged_default)
        return load_config(merged_default, recipe, overrides)


def validate(cfg: DictConfig) -> None:
    """Refuse configs that would fail later, naming the key (raises ConfigError); fills
    data.channels from model.in_chans when it is null."""
    from pretrain.backbones import BackboneError, resolve_backbone_config
    from pretrain.checkpoint import RESUME_MODES
    from pretrain.data.specs import DatasetSpecError, parse_spec
    from pretrain.init_from import LAYOUT_CHOICES
    from pretrain.schedules import LR_SCALING_RULES

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
    for key, spec in specs:
        try:
            parse_spec(str(spec))
        except DatasetSpecError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
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


def setup_logging(level: str) -> None:
    """Rank 0 logs at `level`, other ranks only warnings, so N processes do not print N copies."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Self-supervised pretraining (dinov2, ...): recipe YAML + key=value overrides.",
    )
    parser.add_argument("--config", help=f"recipe YAML (override-only); default {DEFAULT_CONFIG}")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optim.max_steps=100"
    )
    parser.add_argument("--check", action="store_true", help="validate the config, print it, exit")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = compose_config(args.config, args.overrides)
        validate(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.check:
        print(OmegaConf.to_yaml(cfg))
        return EXIT_OK

    from pretrain.checkpoint import ResumeRefused
    from pretrain.engine import TrainingDiverged
    from pretrain.train import run

    try:
        run(cfg)
    except ResumeRefused as exc:  # nothing trained, no checkpoint touched
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TrainingDiverged as exc:
        logger.error("training diverged: %s", exc)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume from the last checkpoint")
        return EXIT_INTERRUPTED
    except Exception:
        logger.exception("pretraining failed")
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
