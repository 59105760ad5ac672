"""Heads that sit on a backbone's features, usable in any loop (like lightly's modules): DINO's
prototype head, SimCLR's projection head and MAE's pixel decoder.

DINOHead is DINOv2's: an MLP to a low-dimensional bottleneck, L2 normalisation, and a weight-
normalised linear layer whose rows are the prototypes. Normalising both the bottleneck and the
prototypes bounds the logits (|logit| <= |g|), which keeps the sharp teacher softmax (T = 0.04)
stable; the weight-norm gain g starts at 1 and stays trainable, as in DINOv2.

Example:
    >>> import torch
    >>> head = DINOHead(in_dim=192, out_dim=256, hidden_dim=512, bottleneck_dim=128)
    >>> head(torch.randn(4, 192)).shape
    torch.Size([4, 256])
    >>> projection_head(512, 512, 128, layers=3, bn=True)(torch.randn(4, 512)).shape
    torch.Size([4, 128])
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
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
    hidden linear layer.

    center_bottleneck (off by default; not in DINO/DINOv2) subtracts the mean over the rows of the
    call from the bottleneck before its L2 normalisation. On near-identical images (28 px chest
    X-rays) the head learns to map every image to one bottleneck direction (cosine 0.99 between
    images, even with use_bn: the last linear layer re-learns it), so the logits differ between
    images by ~0.01, far below the teacher temperature, every target goes uniform and the DINO
    loss teaches nothing. Without the common part, what remains is what differs between the
    images of the batch (docs/benchmarks.md, issue 17). Like BatchNorm without running statistics,
    the result depends on the batch: callers that concatenate class and patch tokens into one
    call centre them together.
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
        center_bottleneck: bool = False,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead needs n_layers >= 1, got {n_layers}")
        self.mlp = _build_mlp(
            n_layers, in_dim, bottleneck_dim, hidden_dim, bias=mlp_bias, use_bn=use_bn
        )
        self.center_bottleneck = center_bottleneck
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
        if self.center_bottleneck:
            x = x - x.mean(dim=0, keepdim=True)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def projection_head(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int, bn: bool
) -> nn.Sequential:
    """SimCLR v2 projection: (layers - 1) x [Linear, BN, ReLU] + Linear (+ BN without bias).

    With BN the linears carry no bias (BN's shift replaces it), as in SimCLR's `linear_layer`.
    """
    if layers < 1:
        raise ValueError(f"projection head needs layers >= 1, got {layers}")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=not bn)]
        mods += [nn.BatchNorm1d(hidden_dim)] if bn else []
        mods += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not bn))
    if bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))  # SimCLR: center=False, no scale on last
    return nn.Sequential(*mods)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE's fixed 2-D sin-cos positions (N, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE: meshgrid(w, h) puts the column index first
    return torch.from_numpy(np.concatenate([embed(rows), embed(cols)], axis=1)).float()


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Fixed 3-D sin-cos positions (N, dim) of a D×H×W patch grid, row-major like a flattened
    3D conv output: a third of the channels each encodes the slice, the row and the column."""
    if dim % 6:
        raise ValueError(f"3-D sin-cos position embedding needs a dim divisible by 6, got {dim}")
    part = dim // 3
    omega = 1.0 / 10000 ** (np.arange(part // 2, dtype=np.float64) / (part / 2.0))
    axes = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([embed(a) for a in axes], axis=1)).float()


class MAEDecoder(nn.Module):
    """MAE decoder: embed, insert mask tokens, unshuffle, sin-cos positions, blocks, pixel head.

    forward(latent (B, prefix + K, embed_dim) of the kept patches, ids_restore (B, N), n_prefix)
    -> (B, N, patch_pixels) predicted pixels of every patch. `grid`: the side of a square patch
    grid, or (D, H, W) of a volume's (3-D positions, `dim` divisible by 6).
    """

    def __init__(
        self,
        embed_dim: int,
        dim: int,
        depth: int,
        heads: int,
        grid: int | tuple[int, int, int],
        patch_pixels: int,
    ):
        super().__init__()
        self.grid = grid
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = (
            sincos_pos_embed_2d(dim, grid)
            if isinstance(grid, int)
            else sincos_pos_embed_3d(dim, tuple(grid))
        )
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor, n_prefix: int) -> Tensor:
        x = self.decoder_embed(latent)
        patches = x[:, n_prefix:]
        n = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(x.shape[0], n - patches.shape[1], -1)
        patches = torch.cat([patches, fill], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        patches = torch.gather(patches, 1, index) + self.pos_embed.to(x.dtype)
        x = torch.cat([x[:, :n_prefix], patches], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, n_prefix:])
