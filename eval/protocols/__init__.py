"""Protocol registry: one module per protocol in this package, each registering itself.

A protocol is a function `run(ctx: EvalContext) -> ProtocolResult` decorated with
`@register("name")`. Dropping a new module here (finetune.py, lora.py...) is enough for
`python -m eval name ...` to find it: `discover()` imports every module of the package.
Feature-based protocols read `ctx.train / ctx.val / ctx.test` (frozen features); protocols that
train the backbone use `ctx.extractor.model`, `ctx.extractor.open(spec)` and `ctx.specs`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eval.protocols.base import EvalContext, ProtocolResult

_NOT_PROTOCOLS = {"base"}


@dataclass(frozen=True)
class Protocol:
    name: str
    run: Callable[[EvalContext], ProtocolResult]
    description: str


_REGISTRY: dict[str, Protocol] = {}


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Cap torch, BLAS and OpenMP threads (0: leave the libraries' defaults).

    Protocol work is many small matrix products: on a busy 2-core machine multi-threaded
    BLAS/OpenMP spends more time synchronising than computing (15x slower measured).
    """
    if threads <= 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


def register(name: str, description: str = "") -> Callable:
    """Decorator: make `run(ctx)` available as protocol `name` (run under `ctx.cfg.threads`)."""

    def wrap(fn: Callable[[EvalContext], ProtocolResult]) -> Callable:
        @functools.wraps(fn)
        def run(ctx: EvalContext) -> ProtocolResult:
            with thread_limit(int(ctx.cfg.threads)):
                return fn(ctx)

        if name in _REGISTRY and _REGISTRY[name].run.__wrapped__ is not fn:  # type: ignore[attr-defined]
            raise ValueError(f"protocol {name!r} registered twice")
        _REGISTRY[name] = Protocol(name, run, description or (fn.__doc__ or "").strip())
        return run

    return wrap


def discover() -> dict[str, Protocol]:
    """Import every protocol module of this package; return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _NOT_PROTOCOLS:
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(_REGISTRY)


def get_protocol(name: str) -> Protocol:
    registry = discover()
    if name not in registry:
        raise KeyError(f"unknown protocol {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]
