"""Exponential moving average teachers (DINO, DINOv2, BYOL-style methods), usable in any loop.

Example:
    >>> import torch
    >>> student = torch.nn.Linear(2, 2)
    >>> teacher = make_ema_teacher(student)
    >>> with torch.no_grad():
    ...     _ = student.weight.add_(1.0)
    >>> ema_update_(*ema_pairs(teacher, student), momentum=0.5)
    >>> torch.allclose(teacher.weight, student.weight - 0.5)
    True
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def make_ema_teacher(student: nn.Module) -> nn.Module:
    """A copy of `student` that is never trained: no gradients (so neither the optimizer nor DDP's
    gradient sync sees it) and no stochastic depth."""
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    teacher.requires_grad_(False)
    return teacher


def set_teacher_mode(teacher: nn.Module, training: bool) -> None:
    """Eval mode (no dropout, no drop path) except BatchNorm, which follows `training`: a teacher
    head's BN normalises with batch statistics, as DINO's does; its running statistics are buffers
    the EMA does not carry, so eval mode would not normalise. Call it from the method's train()."""
    teacher.eval()
    for module in teacher.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(training)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers (their parameters are the same tensors)."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(teacher tensors, student tensors) matched by parameter name; every teacher parameter must
    have a student counterpart (the student may have more, e.g. a mask token)."""
    student_params = dict(unwrap(student).named_parameters())
    teacher_params = dict(teacher.named_parameters())
    missing = sorted(set(teacher_params) - set(student_params))
    if missing:
        raise RuntimeError(f"teacher parameters without student counterpart: {missing[:5]}")
    names = sorted(teacher_params)
    return [teacher_params[n] for n in names], [student_params[n].detach() for n in names]


@torch.no_grad()
def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, one fused kernel for all tensors."""
    if momentum >= 1.0:
        return
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)
