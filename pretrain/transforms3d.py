"""Augmentations for volumes: float tensors C×D×H×W in [0, 1] (what the loader gives for a volume).

The 2D recipes carry over axis by axis: a random resized crop becomes a random box (volume
fraction in `scale`, side ratios in `ratio`) resized trilinearly to a cube; flips are along each
axis (left/right is the only anatomical symmetry, but flips of the other axes are standard in 3D
SSL, e.g. Models Genesis and MONAI's SSL tutorial); intensity jitter is the grayscale preset's
(brightness, contrast, gamma, noise) applied to the whole volume. Normalisation is the 1-channel
default of transforms.py (mean 0.5, std 0.25), recorded in the export like for 2D.

Example:
    >>> import torch
    >>> view = SimCLR3DTransform(16)(torch.rand(1, 20, 24, 24))
    >>> [tuple(v.shape) for v in view]
    [(1, 16, 16, 16), (1, 16, 16, 16)]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

VOLUME_MEAN = (0.5,)
VOLUME_STD = (0.25,)


def _check(volume: Tensor) -> None:
    if volume.ndim != 4:
        raise ValueError(f"expected a C×D×H×W volume, got shape {tuple(volume.shape)}")


def resize_volume(volume: Tensor, size: int | Sequence[int]) -> Tensor:
    """C×D×H×W -> C×size³ (or the given D, H, W) by trilinear interpolation."""
    _check(volume)
    target = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(volume.shape[1:]) == target:
        return volume
    return F.interpolate(volume[None], size=target, mode="trilinear", align_corners=False)[0]


def resample_to_spacing(
    volume: Tensor, spacing: Sequence[float | None], target: Sequence[float]
) -> Tensor:
    """Resample C×D×H×W from `spacing` (mm per voxel along D, H, W; None = keep that axis) to the
    `target` spacing, trilinearly, keeping the physical extent (MONAI's Spacing, without affine)."""
    _check(volume)
    size = [
        n if s is None else max(1, round(n * float(s) / float(t)))
        for n, s, t in zip(volume.shape[1:], spacing, target)
    ]
    return resize_volume(volume, size)


class RandomResizedCrop3D(nn.Module):
    """A random box covering a `scale` fraction of the volume, side ratios within `ratio`,
    resized to a `size`³ cube."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.3, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def box(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """(start, extent) per axis of one random box inside `shape` (D, H, W)."""
        fraction = float(torch.empty(1).uniform_(*self.scale))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        stretch = [math.exp(float(torch.empty(1).uniform_(log_lo, log_hi))) for _ in range(3)]
        norm = (stretch[0] * stretch[1] * stretch[2]) ** (1 / 3)
        side = fraction ** (1 / 3)
        extent = [
            max(1, min(n, round(n * side * s / norm))) for n, s in zip(shape, stretch, strict=True)
        ]
        start = [int(torch.randint(0, n - e + 1, (1,))) for n, e in zip(shape, extent)]
        return start, extent

    def forward(self, volume: Tensor) -> Tensor:
        _check(volume)
        (d0, h0, w0), (d, h, w) = self.box(volume.shape[1:])
        crop = volume[:, d0 : d0 + d, h0 : h0 + h, w0 : w0 + w]
        return resize_volume(crop, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


class RandomFlip3D(nn.Module):
    """Flip each of the D, H, W axes independently with probability p."""

    def __init__(self, p: float = 0.5, axes: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.p, self.axes = float(p), tuple(axes)

    def forward(self, volume: Tensor) -> Tensor:
        dims = [a for a in self.axes if float(torch.rand(1)) < self.p]
        return volume.flip(dims) if dims else volume


class RandomIntensity3D(nn.Module):
    """Brightness, contrast, gamma (each with probability p) and Gaussian noise on a [0, 1]
    volume, one draw per volume; the result is clamped to [0, 1]."""

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        gamma: float = 0.3,
        noise_std: float = 0.02,
        p: float = 0.8,
    ):
        super().__init__()
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.noise_std, self.p = noise_std, p

    def _uniform(self, spread: float) -> float:
        return float(torch.empty(1).uniform_(-spread, spread))

    def forward(self, volume: Tensor) -> Tensor:
        out = volume
        if self.gamma and float(torch.rand(1)) < self.p:
            out = out.clamp(0, 1) ** math.exp(self._uniform(self.gamma))
        if self.contrast and float(torch.rand(1)) < self.p:
            mean = out.mean()
            out = (out - mean) * (1 + self._uniform(self.contrast)) + mean
        if self.brightness and float(torch.rand(1)) < self.p:
            out = out + self._uniform(self.brightness)
        if self.noise_std and float(torch.rand(1)) < self.p:
            out = out + torch.randn_like(out) * float(torch.empty(1).uniform_(0, self.noise_std))
        return out.clamp(0, 1)


class Normalize3D(nn.Module):
    def __init__(self, mean: Sequence[float] = VOLUME_MEAN, std: Sequence[float] = VOLUME_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1))

    def forward(self, volume: Tensor) -> Tensor:
        _check(volume)
        return (volume - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def volume_view(
    size: int,
    scale: tuple[float, float] = (0.3, 1.0),
    *,
    intensity: bool = True,
    mean: Sequence[float] = VOLUME_MEAN,
    std: Sequence[float] = VOLUME_STD,
) -> nn.Sequential:
    """One augmented view: random box -> cube, flips, intensity jitter, normalisation."""
    steps: list[nn.Module] = [RandomResizedCrop3D(size, scale), RandomFlip3D()]
    if intensity:
        steps.append(RandomIntensity3D())
    return nn.Sequential(*steps, Normalize3D(mean, std))


class SimCLR3DTransform:
    """Two independently augmented views of a volume (SimCLR on volumes)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.3, 1.0)):
        self.view = volume_view(size, scale)

    def __call__(self, volume: Tensor) -> list[Tensor]:
        return [self.view(volume), self.view(volume)]

    def __repr__(self) -> str:
        return f"SimCLR3DTransform({self.view})"


def mae3d_transform(size: int, scale: tuple[float, float] = (0.5, 1.0)) -> nn.Sequential:
    """MAE's input: a random box and flips, no intensity jitter (the target is the voxels)."""
    return volume_view(size, scale, intensity=False)


def volume_eval_transform(
    size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> nn.Sequential:
    """Deterministic probe input: the whole volume resized to `size`³, normalised."""
    return nn.Sequential(_Resize(size), Normalize3D(mean or VOLUME_MEAN, std or VOLUME_STD))


def slice_eval_transform(size: int) -> nn.Module:
    """Input of a 2D model over axial slices (the 2.5D baseline): every slice resized to
    `size`², the slice count kept, values left in [0, 1] for the 2D model's own normalisation."""
    return _Resize(size, slices_only=True)


class _Resize(nn.Module):
    def __init__(self, size: int, slices_only: bool = False):
        super().__init__()
        self.size, self.slices_only = int(size), slices_only

    def forward(self, volume: Tensor) -> Tensor:
        if self.slices_only:
            return resize_volume(volume, (volume.shape[1], self.size, self.size))
        return resize_volume(volume, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}{' (slices)' if self.slices_only else ''}, trilinear"
