"""Per-step schedules (lr, weight decay, EMA momentum, teacher temperature...) as numpy arrays.

A schedule is precomputed once for the whole run, so resuming at step N reads exactly the value the
uninterrupted run would have used, and every value that drove a step can be logged. Semantics follow
DINOv2's `CosineScheduler`: `freeze_steps` zeros, then a linear warmup from `start_warmup` to `base`
(both ends included), then a half cosine from `base` towards `final` over the remaining steps.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

LR_SCALING_RULES = ("sqrt", "linear", "none")


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """DINOv2 CosineScheduler as an array of length `total_steps` (float64)."""
    if total_steps < 0 or warmup_steps < 0 or freeze_steps < 0:
        raise ValueError(
            f"schedule lengths must be >= 0 (total {total_steps}, warmup {warmup_steps}, "
            f"freeze {freeze_steps})"
        )
    if freeze_steps + warmup_steps > total_steps:
        raise ValueError(
            f"freeze ({freeze_steps}) + warmup ({warmup_steps}) steps exceed total_steps "
            f"({total_steps}); shorten the warmup or train longer"
        )
    frozen = np.zeros(freeze_steps)
    warmup = np.linspace(start_warmup, base, warmup_steps)
    n = total_steps - warmup_steps - freeze_steps
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(n, 1)))
    return np.concatenate([frozen, warmup, cosine]).astype(np.float64)


def linear_schedule(start: float, end: float, total_steps: int) -> np.ndarray:
    """Linear ramp from `start` to `end` inclusive (e.g. DINOv2's teacher-temperature warmup)."""
    return np.linspace(start, end, total_steps).astype(np.float64)


def constant_schedule(value: float, total_steps: int) -> np.ndarray:
    return np.full(total_steps, float(value), dtype=np.float64)


def warmup_then_constant(
    start: float, value: float, warmup_steps: int, total_steps: int
) -> np.ndarray:
    """Linear warmup then hold: DINOv2 teacher temperature (warmup_teacher_temp_epochs)."""
    warmup_steps = min(warmup_steps, total_steps)
    return np.concatenate(
        [
            linear_schedule(start, value, warmup_steps),
            constant_schedule(value, total_steps - warmup_steps),
        ]
    )


def freeze_first(schedule: np.ndarray, freeze_steps: int) -> np.ndarray:
    """Copy of `schedule` with its first `freeze_steps` values set to 0 (e.g. last-layer lr)."""
    out = np.array(schedule, dtype=np.float64, copy=True)
    out[: max(0, freeze_steps)] = 0.0
    return out


def value_at(schedule: np.ndarray, step: int) -> float:
    """Value at `step`; past the end the last value holds (a run extended after its schedule)."""
    if len(schedule) == 0:
        raise ValueError("empty schedule")
    return float(schedule[min(max(step, 0), len(schedule) - 1)])


def lr_scale(global_batch: int, reference_batch: int, rule: str) -> float:
    """Factor applied to base_lr so that a recipe stays right when the world size changes."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING_RULES}, got {rule!r}")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"batch sizes must be >= 1 (global {global_batch}, reference {reference_batch})"
        )
    ratio = global_batch / reference_batch
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "linear":
        return ratio
    return 1.0


def steps_from_epochs(epochs: float, steps_per_epoch: int) -> int:
    return int(round(epochs * steps_per_epoch))


def self_distillation_schedules(
    lr_schedule: np.ndarray,
    steps_per_epoch: int,
    *,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    freeze_last_layer_epochs: float,
) -> dict[str, np.ndarray]:
    """DINO's and DINOv2's per-step schedules, all of the run's length (that of `lr_schedule`):
    "momentum" of the EMA teacher (cosine to its final value), "teacher_temp" (linear warmup,
    then constant) and "last_layer_lr": the prototypes follow the lr schedule but stay frozen
    (lr 0) for the first epoch(s)."""
    total = len(lr_schedule)
    warmup = min(steps_from_epochs(warmup_teacher_temp_epochs, steps_per_epoch), total)
    freeze = min(steps_from_epochs(freeze_last_layer_epochs, steps_per_epoch), total)
    return {
        "momentum": cosine_schedule(momentum_teacher, final_momentum_teacher, total),
        "teacher_temp": warmup_then_constant(warmup_teacher_temp, teacher_temp, warmup, total),
        "last_layer_lr": freeze_first(np.asarray(lr_schedule, dtype=np.float64), freeze),
    }
