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
from collections.abc import Sequence

from omegaconf import OmegaConf

from pretrain.config import PRETRAIN_DEFAULT, ConfigError, compose_config
from pretrain.validation import validate

logger = logging.getLogger("pretrain")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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
        fromfile_prefix_chars="@",  # launch's private argument files
        description="Self-supervised pretraining (dinov2, ...): recipe YAML + key=value overrides.",
    )
    parser.add_argument("--config", help=f"recipe YAML (override-only); default {PRETRAIN_DEFAULT}")
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
