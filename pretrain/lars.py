"""LARS (You et al. 2017) exactly as SimCLR v1/v2 use it (google-research/simclr `lars_optimizer.py`).

Why not a generic LARS: SimCLR's variant (a) adds weight decay to the gradient *before* the trust
ratio, (b) folds the lr into the momentum buffer (`v = m * v + lr * trust * g; w -= v`), and (c)
skips both weight decay and the trust ratio for biases and normalisation parameters. Groups built
by `pretrain.optim.param_groups_lrd` mark those with `wd_multiplier == 0`; the engine's optimizer
builder turns that into the group flag `lars_adapt=False`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def lars_trust_ratio(param: Tensor, update: Tensor, eta: float) -> Tensor:
    """eta * ||w|| / ||g|| where both norms are positive, else 1 (SimCLR's `tf.where` rule)."""
    w_norm = torch.linalg.vector_norm(param)
    g_norm = torch.linalg.vector_norm(update)
    one = torch.ones((), dtype=param.dtype, device=param.device)
    ratio = torch.where(g_norm > 0, eta * w_norm / g_norm.clamp_min(1e-30), one)
    return torch.where(w_norm > 0, ratio, one)


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum (non-Nesterov by default).

    Per parameter of a group with `lars_adapt=True`:
        g <- grad + weight_decay * w;  lr_eff = lr * eta * ||w|| / ||g||;  v <- m * v + lr_eff * g;
        w <- w - v
    Groups with `lars_adapt=False` use g = grad (no decay) and lr_eff = lr.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0 (got {lr}, {momentum}, "
                f"{weight_decay}, {eta})"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "nesterov": nesterov,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 -- torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eta = group["lr"], group["momentum"], group["eta"]
            adapt, wd = bool(group["lars_adapt"]), group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if adapt:
                    if wd != 0:
                        grad = grad.add(p, alpha=wd)
                    scaled_lr = lr * lars_trust_ratio(p, grad, eta)
                else:
                    scaled_lr = torch.tensor(lr, dtype=p.dtype, device=p.device)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(grad * scaled_lr)
                if group["nesterov"]:
                    p.sub_(momentum * buf + grad * scaled_lr)
                else:
                    p.sub_(buf)
        return loss
