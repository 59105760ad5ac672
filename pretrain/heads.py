"""Projection heads for self-distillation, usable on their own (like lightly's modules).

DINOHead is DINOv2's: an MLP to a low-dimensional bottleneck, L2 normalisation, and a weight-
normalised linear layer whose rows are the prototypes. Normalising both the bottleneck and the
prototypes bounds the logits (|logit| <= |g|), which keeps the sharp teacher softmax (T = 0.04)
stable; the weight-norm gain g starts at 1 and stays trainable, as in DINOv2.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

logger = logging.getLogger(__name__)

LAST_LAYER_NAME = "last_layer"  # param-group code marks parameters under this name as is_last_layer


def _build_mlp(
    n_layers: int,
    in_dim: int,
    bottleneck_dim: int,
    hidden_dim: int,
    bias: bool = True,
    use_bn: bool = False,
) -> nn.Module:
    if n_layers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)

    def hidden(dim_in: int) -> list[nn.Module]:
        norm = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        return [nn.Linear(dim_in, hidden_dim, bias=bias), *norm, nn.GELU()]

    layers: list[nn.Module] = hidden(in_dim)
    for _ in range(n_layers - 2):
        layers += hidden(hidden_dim)
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP (n_layers, GELU) -> L2-normalised bottleneck -> weight-normalised prototypes (no bias).

    forward(x: (N, in_dim)) -> logits (N, out_dim). One head serves class tokens and (iBOT,
    shared head) masked patch tokens: callers concatenate them and call it once.

    use_bn (DINO's `use_bn_in_head`, DINOv2's `use_bn`; off by default) puts BatchNorm after each
    hidden linear layer. On near-identical images (chest X-rays) the class tokens share a large
    common component that the MLP carries into the bottleneck: every image's bottleneck vector
    points the same way (cosine ~0.99), the centred teacher logits differ by less than the
    temperature and the targets go uniform. BN over the batch removes that component.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        mlp_bias: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead needs n_layers >= 1, got {n_layers}")
        self.mlp = _build_mlp(
            n_layers, in_dim, bottleneck_dim, hidden_dim, bias=mlp_bias, use_bn=use_bn
        )
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def out_dim(self) -> int:
        return self.last_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
