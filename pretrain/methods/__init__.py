"""Registry of self-supervised methods: `method: NAME` in a recipe picks `METHODS[NAME]`.

Built-in methods live in `pretrain/methods/NAME.py` and are imported on first use, so a broken or
heavy method module never slows down the others; their defaults live in
`pretrain/configs/method/NAME.yaml` as a single `NAME:` section.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig

from pretrain.methods.base import SSLMethod, StepState

logger = logging.getLogger(__name__)

METHODS: dict[str, type[SSLMethod]] = {}

__all__ = [
    "METHODS",
    "SSLMethod",
    "StepState",
    "build_method",
    "get_method_class",
    "register_method",
]


def register_method(name: str):
    """Class decorator: `@register_method("dinov2") class DINOv2(SSLMethod): ...`."""

    def decorator(cls: type[SSLMethod]) -> type[SSLMethod]:
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise TypeError(f"@register_method({name!r}) needs an SSLMethod subclass, got {cls!r}")
        existing = METHODS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} already registered by {existing.__module__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def _builtin_names() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in ("__init__", "base"))


def get_method_class(name: str) -> type[SSLMethod]:
    """The registered class, importing `pretrain.methods.NAME` when it is not registered yet."""
    if name not in METHODS and name in _builtin_names():
        importlib.import_module(f"pretrain.methods.{name}")
    if name not in METHODS:
        known = sorted(set(METHODS) | set(_builtin_names()))
        raise KeyError(f"unknown method {name!r}; available: {', '.join(known) or 'none'}")
    return METHODS[name]


def build_method(cfg: DictConfig) -> SSLMethod:
    """The configured method, its `check_config` run first (also when `validate` was skipped)."""
    cls = get_method_class(str(cfg.method))
    cls.check_config(cfg)
    return cls(cfg)
