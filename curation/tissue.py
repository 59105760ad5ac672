"""Tissue segmentation, the tile grid and tile quality checks for whole-slide images.

The tissue mask follows CLAM (Lu et al. 2021, `create_patches_fp.py`) on a low-resolution level:
HSV saturation (0-255), median blur (`median_blur` 7, CLAM's mthresh), a threshold (Otsu, CLAM's
`use_otsu`, on log saturation, never below CLAM's fixed `sthresh` 8 so a blank slide stays
blank), morphological closing (`close` 4 px, CLAM's) and opening, then small objects removed and small holes filled.
CLAM filters contours by area in units of a 512 x 512 level-0 reference patch (a_t 100, a_h 16);
here the areas are physical (mm^2), since the mask's scale is known from the slide's mpp.

Quality checks on each tile, each counted on its own: tissue fraction (from the mask), blur
(variance of the Laplacian of the gray tile, the usual focus measure) and pen marks (fraction of
saturated green/blue pixels, ink colours that H&E and IHC stains do not produce; the heuristic
of histolab's pen filters in HSV form).

    >>> mask = tissue_mask(thumbnail, mpp=16.0, params=TissueParams())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CLAM_STHRESH = 8  # CLAM's fixed saturation threshold, the floor under Otsu's


@dataclass(frozen=True)
class TissueParams:
    saturation_threshold: float | None = None  # 0-255; None: Otsu (floored at CLAM's 8)
    median_blur: int = 7
    close: int = 4
    open: int = 2
    min_object_mm2: float = 0.01
    min_hole_mm2: float = 0.01


@dataclass(frozen=True)
class QCParams:
    min_tissue_fraction: float = 0.5
    min_blur_variance: float = 30.0  # variance of the Laplacian (gray levels^2); 0: off
    max_pen_fraction: float = 0.05  # 1: off


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on CLAM's 0-255 scale (OpenCV's definition: (max - min) / max)."""
    arr = rgb.astype(np.float32)
    hi, lo = arr.max(axis=2), arr.min(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(hi > 0, (hi - lo) / hi, 0.0)
    return sat * 255.0


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360)."""
    from skimage.color import rgb2hsv

    return rgb2hsv(rgb)[..., 0] * 360.0


def otsu_threshold(saturation: np.ndarray) -> float:
    """Otsu's threshold on log(1 + saturation). Glass is a narrow peak near 0 and tissue a wide
    spread from pale counterstain (~15) to dark chromogen (~100+): on the linear scale Otsu
    splits the tissue spread and drops its pale part; on the log scale it splits glass from
    tissue."""
    from skimage.filters import threshold_otsu

    logs = np.log1p(saturation)
    if logs.max() == logs.min():
        return float(saturation.max())
    return float(np.expm1(threshold_otsu(logs)))


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of an (h, w, 3) uint8 image whose pixels are `mpp` microns wide."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = _saturation(rgb)
    if params.median_blur > 1:
        sat = ndimage.median_filter(sat, size=params.median_blur)
    if params.saturation_threshold is None:
        threshold = max(otsu_threshold(sat), CLAM_STHRESH)
    else:
        threshold = float(params.saturation_threshold)
    mask = sat > threshold
    if params.close > 1:
        mask = ndimage.binary_closing(mask, structure=np.ones((params.close, params.close)))
    if params.open > 1:
        mask = ndimage.binary_opening(mask, structure=np.ones((params.open, params.open)))
    px_per_mm2 = 1e6 / (mpp * mpp)
    min_object = int(round(params.min_object_mm2 * px_per_mm2))
    min_hole = int(round(params.min_hole_mm2 * px_per_mm2))
    if min_object > 1:
        mask = remove_small_objects(mask, max_size=min_object - 1)
    if min_hole > 1:
        mask = remove_small_holes(mask, max_size=min_hole - 1)
    return mask


def tile_grid(width: int, height: int, tile: float, step: float) -> list[tuple[int, int]]:
    """Top-left corners (level-0 pixels) of the whole tiles of size `tile`, `step` apart."""
    xs = np.arange(0, width - tile + 1e-6, step)
    ys = np.arange(0, height - tile + 1e-6, step)
    return [(int(round(x)), int(round(y))) for y in ys for x in xs]


def tissue_fractions(
    mask: np.ndarray, downsample: float, corners: list[tuple[int, int]], tile: float
) -> np.ndarray:
    """Fraction of each tile's area that the mask (one pixel = `downsample` level-0 pixels)
    calls tissue, by a summed-area table over the mask."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    if not corners:
        return np.zeros(0)
    xy = np.asarray(corners, np.float64) / downsample
    size = tile / downsample
    h, w = mask.shape
    x0 = np.clip(np.round(xy[:, 0]), 0, w).astype(int)
    y0 = np.clip(np.round(xy[:, 1]), 0, h).astype(int)
    x1 = np.clip(np.round(xy[:, 0] + size), 0, w).astype(int)
    y1 = np.clip(np.round(xy[:, 1] + size), 0, h).astype(int)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside / area


def blur_variance(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the gray tile: low for out-of-focus tiles."""
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndimage.laplace(gray).var())


def pen_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels in marker-ink colours: saturated (> 0.35) green-to-blue hues
    (70-250 degrees); hematoxylin's blue-purple lies above, eosin's and DAB's below."""
    sat = _saturation(rgb) / 255.0
    hue = _hue(rgb)
    ink = (sat > 0.35) & (hue >= 70.0) & (hue < 250.0) & (rgb.max(axis=2) > 40)
    return float(ink.mean())


def check_tile(rgb: np.ndarray, tissue: float, qc: QCParams) -> str | None:
    """The first failed check's name (tissue, blur, pen), or None for a kept tile."""
    if tissue < qc.min_tissue_fraction:
        return "tissue"
    if qc.max_pen_fraction < 1.0 and pen_fraction(rgb) > qc.max_pen_fraction:
        return "pen"
    if qc.min_blur_variance > 0 and blur_variance(rgb) < qc.min_blur_variance:
        return "blur"
    return None
