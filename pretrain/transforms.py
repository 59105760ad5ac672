"""Augmentations for self-supervised pretraining and evaluation, on float tensors C×H×W in [0, 1].

Natural-image recipes assume RGB photographs; medical images are not. The `preset` argument picks
the intensity augmentation that respects the modality:

- "gray" (X-ray, CT, MR, ultrasound): random window, brightness, contrast and gamma applied with
  the same parameters to every channel, so a grayscale image stays grayscale (hue/saturation
  jitter would invent colours that no scanner produces);
- "rgb" (fundus, dermatology photographs): the usual ColorJitter 0.4/0.4/0.2/0.1 and random grayscale;
- "pathology" (H&E / IHC slides): stain jitter in HED optical-density space (Ruifrok & Johnston
  2001; Tellez et al. 2018), random 90-degree rotations and vertical flips, since slides have no
  canonical orientation.

`channels` decides what the backbone sees: "repeat" (or 3) makes 1-channel images 3-channel,
1 keeps one channel (for `in_chans=1` backbones) and turns RGB input into luminance.
Default normalisation: ImageNet mean/std for 3 channels (what pretrained timm weights expect,
also for repeated gray), mean 0.5 / std 0.25 for 1 channel (maps [0, 1] to about [-2, 2]).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

logger = logging.getLogger(__name__)

PRESETS = ("gray", "rgb", "pathology")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.25,)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as torchvision's rgb_to_grayscale

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_OD_EPS = 1e-6


def _out_channels(channels: int | str) -> int:
    if channels in ("repeat", 3, "3"):
        return 3
    if channels in (1, "1"):
        return 1
    raise ValueError(f"channels must be 'repeat', 3 or 1, got {channels!r}")


def default_mean_std(channels: int | str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (IMAGENET_MEAN, IMAGENET_STD) if _out_channels(channels) == 3 else (GRAY_MEAN, GRAY_STD)


class ToChannels(torch.nn.Module):
    """1 -> 3 channels by repetition, 3 -> 1 by luminance; leaves matching inputs alone."""

    def __init__(self, channels: int | str):
        super().__init__()
        self.out = _out_channels(channels)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.out:
            return img
        if c == 1 and self.out == 3:
            return img.repeat(3, 1, 1)
        if c == 3 and self.out == 1:
            w = torch.tensor(LUMA_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
            return (img * w).sum(dim=-3, keepdim=True)
        raise ValueError(f"cannot turn a {c}-channel image into {self.out} channel(s)")


class Clamp01(torch.nn.Module):
    """Bicubic resizing overshoots [0, 1]; colour ops and solarize assume that range."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.clamp_(0.0, 1.0)


class RandomGrayIntensity(torch.nn.Module):
    """Random window, brightness, contrast and gamma with one scalar set per image.

    Every channel gets the same elementwise map, so equal channels stay equal (gray stays gray).
    """

    def __init__(
        self,
        window: float = 0.1,
        brightness: float = 0.4,
        contrast: float = 0.4,
        gamma: tuple[float, float] = (0.7, 1.5),
        p: float = 0.8,
    ):
        super().__init__()
        self.window, self.brightness, self.contrast, self.gamma, self.p = (
            window,
            brightness,
            contrast,
            gamma,
            p,
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        u = torch.rand(5).tolist()
        lo, hi = u[0] * self.window, 1.0 - u[1] * self.window
        img = ((img - lo) / (hi - lo)).clamp(0.0, 1.0)
        img = (img * (1.0 + self.brightness * (2 * u[2] - 1))).clamp(0.0, 1.0)
        mean = img.mean()
        img = ((img - mean) * (1.0 + self.contrast * (2 * u[3] - 1)) + mean).clamp(0.0, 1.0)
        log_lo, log_hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        return img.pow(math.exp(log_lo + (log_hi - log_lo) * u[4]))


class RandomHEDJitter(torch.nn.Module):
    """Stain augmentation: scale and shift each HED optical-density channel (Tellez et al. 2018).

    rgb -> OD = -log(rgb); stains = OD @ inv(M); s' = s * U(1-sigma, 1+sigma) + U(-sigma, sigma);
    back with OD' = s' @ M, rgb = exp(-OD'). Intensities are in skimage's normalised OD units
    (divided by -log(1e-6)) so sigma means the same as in skimage-based implementations. Unlike
    skimage's rgb2hed we do not clip negative stain values, so sigma=0 returns the input exactly.
    """

    def __init__(self, sigma: float = 0.05, p: float = 0.8):
        super().__init__()
        self.sigma, self.p = sigma, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-3] != 3:
            raise ValueError(f"HED stain jitter needs an RGB image, got {img.shape[-3]} channel(s)")
        if torch.rand(()) >= self.p:
            return img
        log_adjust = math.log(_OD_EPS)
        rgb = img.clamp(min=_OD_EPS).movedim(-3, -1)  # H×W×3
        stains = (rgb.log() / log_adjust) @ HED_FROM_RGB.to(img)
        alpha = 1.0 + self.sigma * (2 * torch.rand(3) - 1)
        beta = self.sigma * (2 * torch.rand(3) - 1)
        stains = stains * alpha.to(img) + beta.to(img)
        out = torch.exp(-(stains * -log_adjust) @ RGB_FROM_HED.to(img))
        return out.clamp(0.0, 1.0).movedim(-1, -3).contiguous()


class RandomRot90(torch.nn.Module):
    """Rotation by 0/90/180/270 degrees: slides and dermoscopy have no canonical orientation."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


def _blur(size: int, p: float) -> v2.Transform:
    """Kernel about 10% of the crop (SimCLR), sigma 0.1-2.0 at 224 px, scaled down for small crops."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    sigma_max = max(0.2, 2.0 * size / 224)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=p)


def modality_jitter(preset: str, strength: float = 1.0) -> list[torch.nn.Module]:
    """The intensity/colour augmentation of `preset` (plus its extra geometry for pathology).

    strength scales the jitter ranges (SimCLR's `color_jitter_strength`: 1.0 ImageNet, 0.5
    CIFAR); in X-rays global brightness is part of the finding (opacity), so full-strength
    intensity invariance can cost accuracy.
    """
    if strength < 0:
        raise ValueError(f"jitter strength must be >= 0, got {strength}")
    if preset == "gray":
        return [
            RandomGrayIntensity(
                window=0.1 * strength,
                brightness=0.4 * strength,
                contrast=0.4 * strength,
                gamma=(0.7**strength, 1.5**strength),
            )
        ]
    if preset == "rgb":
        b, c, sat, hue = (strength * v for v in (0.4, 0.4, 0.2, 0.1))
        return [
            ToChannels(3),
            v2.RandomApply([v2.ColorJitter(b, c, sat, hue)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    if preset == "pathology":
        return [
            ToChannels(3),
            v2.RandomVerticalFlip(),
            RandomRot90(),
            RandomHEDJitter(0.05 * strength),
        ]
    raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")


def _crop(size: int, scale: tuple[float, float]) -> list[torch.nn.Module]:
    return [
        v2.RandomResizedCrop(
            size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        Clamp01(),
        v2.RandomHorizontalFlip(),
    ]


def _finish(
    channels: int | str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> list[torch.nn.Module]:
    d_mean, d_std = default_mean_std(channels)
    return [ToChannels(channels), v2.Normalize(list(mean or d_mean), list(std or d_std))]


class MultiCropTransform:
    """DINOv2 multi-crop: 2 global crops and `n_local` local crops of one image.

    Returns {"global_crops": [2 × C×G×G], "local_crops": [n_local × C×L×L]}; the DataLoader's
    default collate turns that into lists of B×C×S×S tensors.

    Blur probabilities are the ones DINOv2 intends (global crop 1: 1.0, global crop 2: 0.1 plus
    solarize 0.2, locals: 0.5). DINOv2's own `GaussianBlur(p)` wraps `RandomApply(p=1 - p)`, so its
    code actually never blurs global crop 1 and blurs global crop 2 with p = 0.9; we do not copy that.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        *,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        preset: str = "gray",
        jitter_strength: float = 1.0,
        channels: int | str = "repeat",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        jitter = modality_jitter(preset, jitter_strength)
        finish = _finish(channels, mean, std)
        self.n_local = n_local
        self.global1 = v2.Compose(
            [*_crop(global_size, global_scale), *jitter, _blur(global_size, 1.0), *finish]
        )
        self.global2 = v2.Compose(
            [
                *_crop(global_size, global_scale),
                *jitter,
                _blur(global_size, 0.1),
                v2.RandomSolarize(0.5, p=0.2),
                *finish,
            ]
        )
        self.local = v2.Compose(
            [*_crop(local_size, local_scale), *jitter, _blur(local_size, 0.5), *finish]
        )

    def __call__(self, img: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {
            "global_crops": [self.global1(img), self.global2(img)],
            "local_crops": [self.local(img) for _ in range(self.n_local)],
        }


def mae_transform(
    size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    channels: int | str = "repeat",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """MAE's view: crop and flip only (masking is the augmentation); returns one C×S×S tensor."""
    return v2.Compose([*_crop(size, scale), *_finish(channels, mean, std)])


class SimCLRTransform:
    """Two independently augmented views [C×S×S, C×S×S] (crop 0.08-1, flip, jitter, blur 0.5)."""

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        preset: str = "gray",
        jitter_strength: float = 1.0,
        channels: int | str = "repeat",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.view = v2.Compose(
            [
                *_crop(size, scale),
                *modality_jitter(preset, jitter_strength),
                _blur(size, 0.5),
                *_finish(channels, mean, std),
            ]
        )

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [self.view(img), self.view(img)]


STAIN_METHODS = ("macenko", "reinhard")


class StainNormalize(torch.nn.Module):
    """H&E stain normalisation to a reference image: Macenko (stain vectors by SVD of optical
    density) or Reinhard (LAB mean/std), from torchstain's numpy backend. Takes and returns the
    float C x H x W RGB tensors in [0, 1] that every transform here takes; a tile whose stains
    cannot be estimated (too little tissue: Macenko's eigen-decomposition needs stained pixels)
    passes through unchanged.

    >>> norm = StainNormalize("reinhard", reference_rgb_uint8)  # doctest: +SKIP
    >>> tile = norm(tile)                                        # doctest: +SKIP
    """

    def __init__(self, method: str, reference: np.ndarray):
        super().__init__()
        import torchstain

        if method not in STAIN_METHODS:
            raise ValueError(f"stain normalisation must be one of {STAIN_METHODS}, got {method!r}")
        ref = np.asarray(reference)
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise ValueError("the stain reference must be an RGB uint8 image")
        self.method = method
        if method == "macenko":
            self._norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        else:
            self._norm = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
        self._norm.fit(ref)
        self.failures = 0

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 3:
            return img  # stains are an RGB notion
        rgb = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        import warnings

        try:
            # 0/0 (a flat tile's zero standard deviation) raises instead of giving NaN pixels
            with np.errstate(divide="raise", invalid="raise"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if self.method == "macenko":
                    out, _, _ = self._norm.normalize(I=rgb, stains=False)
                else:
                    out = self._norm.normalize(rgb)
            out = np.asarray(out, dtype=np.float32)
            if not np.isfinite(out).all():
                raise ValueError("non-finite result")
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError):
            self.failures += 1
            return img
        out = np.clip(out, 0, 255)
        return torch.from_numpy(out / 255.0).permute(2, 0, 1).contiguous()


def stain_transform(method: str | None, reference_path: str | None) -> StainNormalize | None:
    """The StainNormalize of a config (`stain_norm.method`, `stain_norm.reference`), or None."""
    if not method:
        return None
    if not reference_path:
        raise ValueError(
            f"stain_norm.method={method} needs stain_norm.reference=IMAGE (an RGB tile)"
        )
    import numpy as np
    from PIL import Image

    with Image.open(reference_path) as im:
        return StainNormalize(method, np.asarray(im.convert("RGB")))


def eval_transform(
    img_size: int,
    channels: int | str = "repeat",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    crop_pct: float = 1.0,
) -> v2.Compose:
    """Deterministic probe input: resize the short side, centre-crop to `img_size`, normalise.

    crop_pct=1.0 keeps the whole field of view of square medical images (a border crop can cut
    away the finding); crop_pct=0.875 reproduces the ImageNet protocol.
    """
    resize = max(img_size, round(img_size / crop_pct))
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            Clamp01(),
            *_finish(channels, mean, std),
        ]
    )


def build_pretrain_transform(
    method: str,
    *,
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 8,
    preset: str = "gray",
    channels: int | str = "repeat",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """The training transform of `method` ("dinov2" | "mae" | "simclr")."""
    if method == "dinov2":
        return MultiCropTransform(
            global_size, local_size, n_local, preset=preset, channels=channels, mean=mean, std=std
        )
    if method == "mae":
        return mae_transform(global_size, channels=channels, mean=mean, std=std)
    if method == "simclr":
        return SimCLRTransform(global_size, preset=preset, channels=channels, mean=mean, std=std)
    raise ValueError(f"unknown pretraining method {method!r}; choose dinov2, mae or simclr")
