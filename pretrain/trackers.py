"""Experiment trackers beside the JSON lines: TensorBoard event files and Weights & Biases.

The metrics.jsonl of each stage stays the record; trackers mirror its numeric fields so runs can
be followed the way users of DINOv2, lightly and solo-learn do. Both come from their own
libraries (torch.utils.tensorboard; wandb, an optional extra). W&B defaults to offline mode: a
run on patient data sends nothing anywhere unless `wandb_mode=online` is asked for, and it is
given no paths, only the numbers and the config's hash-level summary passed in `config`.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     trackers = Trackers(d, tensorboard=True)
...     trackers.log({"loss": 1.5, "note": "text is skipped"}, step=1)
...     trackers.close()
...     len(list(Path(d, "tensorboard").iterdir()))
1
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_MODES = ("offline", "online", "disabled")


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


class TrackerError(ValueError):
    """A tracker that was asked for but cannot run (library missing, bad mode)."""


def _scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)) and key != "step":
            out[f"{prefix}{key}"] = float(value)
    return out


class Trackers:
    """TensorBoard and/or W&B writers for one output folder (no-ops when neither is on)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_mode: str = "offline",
        wandb_project: str = "medssl",
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        prefix: str = "",
    ):
        self.prefix = prefix
        self.tb = self.wandb_run = None
        out = Path(out_dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)
        if wandb:
            if wandb_mode not in WANDB_MODES:
                raise TrackerError(f"logging.wandb_mode must be one of {WANDB_MODES}")
            try:
                import wandb as wandb_lib
            except ImportError as exc:
                raise TrackerError(
                    "logging.wandb=true needs Weights & Biases: pip install 'medssl[wandb]'"
                ) from exc
            out.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb_lib.init(
                project=wandb_project,
                dir=str(out),
                mode=wandb_mode,
                config=dict(config or {}),
                resume="allow",
                reinit="create_new",
            )

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Mirror the numeric fields of one metrics record at `step`."""
        values = _scalars(record, self.prefix)
        if not values:
            return
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
